"""Infrastructure: how the services start locally (servers, stack) and deploy."""
