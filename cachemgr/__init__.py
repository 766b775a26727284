"""The cache manager: catalog, policies, eviction and the match predictor."""
