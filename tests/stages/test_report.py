import json
import shutil
import subprocess

import numpy as np


def test_the_report_gathers_every_stage_and_its_charts_render(model_run, tmp_path):
    _, workdir, r = model_run
    assert r.returncode == 0, r.stderr
    [run] = [p for p in (workdir / "report").iterdir() if p.is_dir()]
    assert f"report: {run / 'report.html'}" in r.stdout.replace("\n", "")
    page = (run / "report.html").read_text()
    for section in ("Quality gate", "Bits per byte", "Domain benchmarks", "Checkpoint selection", "Models", "Data",
                    "Tokenizer", "fertility", "Loss curves", "Sample answers next to the references", "reference"):
        assert section in page, section
    assert page.count("data:image/png;base64,") == 4  # two bar charts, two loss curves
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained
    md = (run / "report.md").read_text()
    assert md.startswith("# slmforge report") and "## Quality gate" in md and "| specialist |" in md
    assert "### Where the benchmarks come from" in md and "Where the benchmarks come from" in page
    assert "| mcq | extractive | extractive | yes: a gain may be the generator's style | no |" in md
    results = json.loads(next((workdir / "evaluate").glob("*/results.json")).read_text())
    assert results["answers"]["specialist"]["slmforge_qa"][0]["target"]
    _screenshot_shows_the_charts(run / "report.html", tmp_path / "shot.png")


def _screenshot_shows_the_charts(page, png):
    """Render the report in headless Chromium and check the pictures are drawn, not just present."""
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "make test installs Debian's chromium; run: apt-get install -y chromium"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png.parent / 'chrome'}", "--hide-scrollbars", "--window-size=1000,4000",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = (abs(img[..., 0] - 31) < 30) & (abs(img[..., 1] - 119) < 30) & (abs(img[..., 2] - 180) < 30)
    orange = (abs(img[..., 0] - 255) < 30) & (abs(img[..., 1] - 127) < 30) & (abs(img[..., 2] - 14) < 40)
    assert blue.sum() > 2000 and orange.sum() > 2000, (blue.sum(), orange.sum())  # bars and curves drawn


def test_provenance_says_when_a_scored_model_wrote_its_own_benchmark():
    from slmforge.stages.report import provenance

    doc = {"provenance": {"qa": {"generator": "hf:smollm2-135m", "training_data": "extractive",
                                 "same_generator": False, "same_prompt_shape": False}},
           "results": {"models": {"specialist": {}, "smollm2": {"base": "smollm2-135m"}}}}
    head, rows, notes = provenance(doc)
    assert rows == [["qa", "hf:smollm2-135m", "extractive", "no", "no"]] and len(head) == 5
    assert notes == ["smollm2 is scored on the qa set, which the same model wrote: it may find its own questions "
                     "easier than other models do."]


def test_compression_section_lists_each_variant_against_its_teacher():
    from slmforge.stages.report import compression

    pruning = {"shape": {"layers": 17, "hidden": 288, "heads": 6, "kv_heads": 3, "ffn": 896},
               "teacher_shape": {"layers": 30}, "calibration_tokens": 32768, "removed_layers": [2, 3],
               "importance_kept": {"hidden": 0.61, "heads": 0.7, "ffn": 0.64}}
    models = {"specialist": {"shape": {"params": 134_500_000}},
              "pruned-kd": {"shape": {"params": 33_000_000}, "teacher": {"params": 134_500_000}, "init": "pruned",
                            "loss": "kd", "alpha": 0.5, "temperature": 1.0, "tokens": 65536,
                            "flops_with_pruning": 3.9e13, "pruning": pruning},
              "scratch-lm": {"shape": {"params": 33_000_000}, "teacher": {"params": 134_500_000}, "init": "scratch",
                             "loss": "lm", "tokens": 65536, "flops_with_pruning": 1.3e13, "pruning": pruning}}
    head, rows, notes = compression(models)
    assert [r[0] for r in rows] == ["pruned-kd", "scratch-lm"] and len(head) == len(rows[0])
    assert rows[0][1:4] == ["pruned teacher", "distillation (alpha 0.5, T 1.0)", "33.00M (25%)"]
    assert rows[1][1:3] == ["random", "LM loss"] and "17 layers, hidden 288, heads 6/3 kv" in rows[1][4]
    assert "removed layers [2, 3] of 30" in notes[0] and "61% of the hidden" in notes[0]
    assert compression({"specialist": {"shape": {"params": 1}}}) == (head, [], [])
