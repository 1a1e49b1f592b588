"""What a first run from a fresh clone shows: the bundled cards count parameters as `onnxzip eval` does, merge
keeps warnings on stderr and results on stdout (no bare progress label where stderr is not a terminal), the README
quick start can be run twice and writes under the ignored out/ folder."""

import glob
import json
import os
import re

from click.testing import CliRunner

from onnxzip.cli import cli
from onnxzip.evaluate import count_parameters
from onnxzip.onnx_io import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")


def test_bundled_cards_count_parameters_as_eval_does():
    cards = sorted(glob.glob(os.path.join(MODELS, "**", "card.json"), recursive=True))
    assert len(cards) >= 12
    for path in cards:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
        folder = os.path.dirname(path)
        members = [m for m in "abcdefgh" if os.path.isfile(os.path.join(folder, f"{m}.onnx"))]
        assert len(members) >= 2, path
        # a pair's card holds one count (both models have it); a group's, one per model (heads differ in size)
        counts = card["parameters"] if isinstance(card["parameters"], dict) else dict.fromkeys(members,
                                                                                               card["parameters"])
        assert sorted(counts) == members, path
        for m in members:
            assert counts[m] == count_parameters(load_model(os.path.join(folder, f"{m}.onnx"))), path
        readme = os.path.join(folder, "README.md")
        if os.path.exists(readme):
            with open(readme, encoding="utf-8") as f:
                text = f.read()
            for count in set(counts.values()):
                assert f"| {count:,} |" in text, readme


def test_merge_keeps_its_notices_on_stderr(tmp_path):
    a, b = (os.path.join(MODELS, "mlp-s0", f"{m}.onnx") for m in "ab")
    result = CliRunner().invoke(cli, ["merge", a, b, "--data", os.path.join(MODELS, "data", "calib.npy"),
                                      "-o", str(tmp_path / "m.onnx"), "--num-samples", "300", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "too thin to trust" in result.stderr  # 240 samples for 2 x 256 features
    assert not any(line.lower().startswith("warning") for line in result.stdout.splitlines())
    assert "too thin" not in result.stdout
    assert "thin statistics in 3 feature space(s)" in result.stdout
    assert "calibrating" not in [line.strip() for line in result.stderr.splitlines()]
    assert "calibrating on 240 samples (3 feature spaces)" in result.stderr


def test_readme_quick_start_is_rerunnable_and_writes_under_an_ignored_folder():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    quick = readme[readme.index("## Quick start"):readme.index("## Results")]
    merge = next(line for line in quick.splitlines() if "onnxzip merge" in line)
    output = re.search(r"-o (\S+)", merge).group(1)
    assert "--force" in merge and output.startswith("out/")
    with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
        assert "/out/" in f.read().split()
    assert "onnxzip deploy out/" in quick and "--triton out/" in quick
