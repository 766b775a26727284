"""The demo (`t2i demo`, what scripts/demo.sh runs) against the test stack: a scene-world
session of edits and re-rolls, one job after another, so later jobs resume from earlier
ones; images and a contact sheet are written. The test stack serves the tiny model, so this
tests the session and its reporting, not the pictures."""

from __future__ import annotations

import pytest
from PIL import Image

from producer import cli
from producer.client import Client

pytestmark = pytest.mark.e2e


def test_demo_session_reuses_earlier_jobs_and_writes_a_contact_sheet(stack, tmp_path, capsys):
    args = cli.build_parser().parse_args(["demo", "-n", "6", "--steps", "25",
                                          "-o", str(tmp_path)])
    assert args.trace == "scene"
    assert cli.cmd_demo(Client(stack), args) == 0
    printed = capsys.readouterr().out
    assert printed.count("succeeded") == 6
    # The session re-rolls and edits with other seeds: those resume (K 1 of 25, the seed cap).
    assert "resume (" in printed
    assert "background" in printed  # scene-world prompts
    pngs = [path for path in tmp_path.glob("*.png") if path.name != "sheet.png"]
    assert len(pngs) == 6 and all(Image.open(p).size == (64, 64) for p in pngs)
    assert Image.open(tmp_path / "sheet.png").size == (6 * 128, 128)
