import json
import shutil
import subprocess

import numpy as np


def test_the_report_gathers_every_stage_and_its_charts_render(model_run, tmp_path):
    recipe, workdir, r = model_run
    assert r.returncode == 0, r.stderr
    [run] = [p for p in (workdir / "report").iterdir() if p.is_dir() and not p.is_symlink()]
    assert f"report: {run / 'report.html'}" in r.stdout.replace("\n", "")
    page = (run / "report.html").read_text()
    for section in ("Quality gate", "Bits per byte", "Domain benchmarks", "Checkpoint selection", "Models", "Data",
                    "Tokenizer", "fertility", "Loss curves", "Sample answers next to the references", "reference"):
        assert section in page, section
    assert page.count("data:image/png;base64,") == 4  # two bar charts, two loss curves
    assert "http://" not in page.replace("http://www.w3.org", "")  # self-contained
    md = (run / "report.md").read_text()
    assert md.startswith("# slmforge report") and "## Quality gate" in md and "| specialist |" in md
    said = json.loads((run / "manifest.json").read_text())["metrics"]["verdict"]
    # the verdict opens both: exactly the sentence the evaluate results it read give (the wording of each
    # outcome is pinned by the unit tests below)
    from slmforge.evaluation.verdict import verdict

    ev = next(p for p in (workdir / "evaluate").iterdir() if p.is_dir() and not p.is_symlink())
    want = verdict(json.loads((ev / "results.json").read_text()))
    assert want["outcome"] in ("win", "tie", "loss") and want["rival"] == "generalist", want
    assert said == {k: want[k] for k in ("outcome", "best", "rival", "diff", "p") if k in want}
    assert md.split("\n")[2] == f"**{want['sentence']}**"
    for line in (f"- Run: report {run.name}, built ", f"- Recipe: t ({recipe.resolve()})",
                 f"- Exports: {workdir.resolve() / 'export' / 'latest'} once the export stage has run",
                 f"`slmforge path export --recipe {recipe.resolve()}`"):
        assert line in md, (line, md[:2000])
    assert f"report {run.name}, built " in page and f"<code>slmforge path export --recipe {recipe.resolve()}</code>" in page
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
    assert notes == [("smollm2 is scored on the qa set, which the same model wrote: it may find its own questions "
                      "easier than other models do.")]


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


# ---- the verdict, from synthetic evaluate results ------------------------------------------------------
def _results(specialist: int, smollm2: int, generalist: int = 40, items: int = 100, outcomes: bool = True) -> dict:
    """evaluate's results for one choice set (mcq acc) of `items` items: each model right on its first
    k items, so that the paired test sees exactly the differences of the counts."""
    right = {"specialist": specialist, "smollm2": smollm2, "generalist": generalist}
    per = {n: [1.0] * k + [0.0] * (items - k) for n, k in right.items()}
    models = {"specialist": {"stage": "pretrain", "shape": {"params": 2_901_312}, "tokens": 2_187_264,
                             "flops": 3.8e13, "train_time_s": 244.0},
              "generalist": {"stage": "pretrain", "shape": {"params": 2_901_312}, "tokens": 2_187_264},
              "smollm2": {"stage": None, "base": "smollm2-135m", "shape": {"params": 134_515_008},
                          "pretrain_tokens": 2e12, "pretrain_flops": 1.6e21}}
    return {"models": models, "headline": {"mcq": "acc"}, "bench_sizes": {"mcq": items, "qa": items},
            "baselines": {"mcq": {"chance": 0.25, "items": items, "longest_option": 0.3}},
            "benchmarks": {n: {"slmforge_mcq": {"acc": k / items}, "slmforge_qa": {"exact_match": 0.0 if n != "smollm2"
                                                                                   else 0.02}}
                           for n, k in right.items()},
            "outcomes": {n: {"slmforge_mcq": {"acc": o}} for n, o in per.items()} if outcomes else {},
            "scores": {}, "margins": {}, "domain_sources": [], "gate": None}


def test_the_verdict_names_a_significant_win_with_its_margin_rivals_and_cost():
    from slmforge.evaluation.verdict import verdict

    v = verdict(_results(specialist=80, smollm2=50))
    assert v["outcome"] == "win" and v["best"] == "specialist" and v["rival"] == "smollm2" and v["p"] < 0.001
    s = v["sentence"]
    assert s.startswith("The best model on the domain is specialist: 0.800 on the choice sets' headline metrics "
                        "(mcq acc over 100 items), +0.300 over the strongest generalist, smollm2 (0.500, the "
                        "pretrained base smollm2-135m with 134.5M parameters), a significant gain (McNemar"), s
    assert "specialist beats the same-size generalist (0.400): +0.400, p < 0.001" in s
    assert "2.9M parameters (2.2% of smollm2's 134.5M), 2.2M training tokens, 3.8e13 FLOPs and 4.1 min of " \
           "training (against smollm2's 2.0T tokens and 1.6e21 FLOPs of pretraining)." in s


def test_a_gain_inside_the_noise_is_no_gain_and_a_loss_is_said():
    from slmforge.evaluation.verdict import verdict

    tie = verdict(_results(specialist=52, smollm2=50))  # 2 items against 0: p = 0.5
    assert tie["outcome"] == "tie" and tie["p"] == 0.5, tie
    assert tie["sentence"].startswith("No model of this run is significantly better on the domain than the strongest "
                                      "generalist, smollm2 (0.500"), tie["sentence"]
    assert "+0.020: inside the noise (McNemar exact test on the same items, p = 0.5), so no gain" in tie["sentence"]
    loss = verdict(_results(specialist=30, smollm2=70, generalist=20))
    assert loss["outcome"] == "loss" and loss["diff"] == -0.4
    assert loss["sentence"].startswith("The best model on the domain is the generalist smollm2 (0.700, ")
    assert "the best of them, specialist, scores 0.300" in loss["sentence"] and "-0.400: significantly worse" in \
        loss["sentence"] and "specialist beats the same-size generalist (0.200): +0.100, p = 0.002" in loss["sentence"]


def test_a_dapt_verdict_names_the_recovered_control_and_the_4_bit_base():
    """DAPT: the rivals are the base as it is and `recovered` (the base continued on general text for the
    specialist's tokens); the strongest one leads the sentence, and the base is named as a 4-bit copy."""
    from slmforge.evaluation.verdict import verdict

    r = _results(specialist=75, smollm2=40, generalist=60)
    r["models"]["recovered"] = {**r["models"].pop("generalist"), "shape": {"params": 134_515_008},
                                "control": {"of": "specialist", "text": "general", "tokens": 102_400, "steps": 25,
                                            "base": "smollm2-135m", "quantized": "Q4_1"}}
    r["models"]["specialist"]["shape"] = {"params": 134_515_008}
    r["models"]["smollm2"]["quantized"] = "Q4_1"
    for k in ("benchmarks", "outcomes"):
        r[k]["recovered"] = r[k].pop("generalist")
    v = verdict(r)
    assert v["rival"] == "recovered" and v["outcome"] == "win", v
    assert v["sentence"].startswith(
        "The best model on the domain is specialist: 0.750 on the choice sets' headline metrics (mcq acc over 100 "
        "items), +0.150 over the strongest generalist, recovered (0.600, smollm2-135m continued on general text only "
        "for the specialist's 102.4k tokens and schedule, from a dequantized Q4_1 copy), a significant gain"), v
    assert "specialist beats smollm2 (0.400, the pretrained base smollm2-135m with 134.5M parameters, as a " \
           "dequantized Q4_1 copy): +0.350" in v["sentence"]


def test_the_bits_per_byte_line_tests_the_best_model_against_the_lowest_generalist_per_document():
    from scipy.stats import wilcoxon

    from slmforge.evaluation.verdict import bpb_line

    r = _results(specialist=75, smollm2=40, generalist=60)
    r["models"]["dpo"] = {"stage": "dpo", "shape": {"params": 2_901_312}}
    spec = [0.80, 0.95, 0.70, 1.10, 0.85, 0.90, 0.75, 1.00]
    docs = {"specialist": spec, "generalist": [x + 0.05 for x in spec[:-1]] + [0.98],
            "smollm2": [x + 0.10 for x in spec], "dpo": [x + 0.02 for x in spec]}
    r["domain_sources"] = ["pg"]
    r["scores"] = {n: {"pg": {"bpb": round(sum(d) / len(d), 4), "docs": d}} for n, d in docs.items()}
    line = bpb_line(r)
    assert line.startswith("Bits per byte on the domain's test text (pg; lower is better): specialist 0.881, "
                           "dpo 0.901, generalist 0.922, smollm2 0.981."), line
    p = 2 * wilcoxon(docs["specialist"], docs["generalist"]).pvalue  # best of 2 trained models
    assert f"specialist against the lowest generalist, generalist: lower on 7 of 8 documents, a significant gain " \
           f"(Wilcoxon signed-rank test on the per-document bits per byte, p = {p:.2g}, Bonferroni-corrected for " \
           "picking the best of 2 models)." in line, line
    docs["generalist"] = [x + d for x, d in zip(spec, (0.01, -0.01, 0.02, -0.02, 0.01, -0.01, 0.0, 0.005))]
    r["scores"]["generalist"]["pg"] = {"bpb": 0.882, "docs": docs["generalist"]}
    assert "no significant difference" in bpb_line(r)
    del r["scores"]["generalist"]["pg"]["docs"]
    assert "No paired test of specialist against generalist: evaluate kept no per-document scores." in bpb_line(r)


def test_missing_evaluate_data_gives_no_verdict_rather_than_a_guess():
    from slmforge.evaluation.verdict import verdict

    assert verdict({})["outcome"] == "none" and verdict({})["sentence"].startswith("No verdict: evaluate recorded no")
    alone = _results(specialist=80, smollm2=50)
    for n in ("smollm2", "generalist"):
        del alone["benchmarks"][n]
    v = verdict(alone)
    assert v["outcome"] == "none" and v["sentence"].startswith("No verdict against a generalist, because evaluate "
                                                               "scored none") and "specialist, 0.800" in v["sentence"]
    v = verdict(_results(specialist=80, smollm2=50, outcomes=False))
    assert v["outcome"] == "untested" and "kept no per-item outcomes, so whether that is more than noise is " \
        "unknown" in v["sentence"]


def test_the_page_opens_with_the_verdict_and_run_lines_and_flags_a_zero(tmp_path):
    from slmforge.evaluation.verdict import verdict
    from slmforge.stages.report import render_html, render_markdown

    m = _results(specialist=52, smollm2=50)
    doc = {"title": "t", "results": m, "verdict": verdict(m), "bench": {}, "samples": 0, "lineage": {},
           "curate": {"splits": {}, "roles": {}, "filters": {}, "docs_in": 0},
           "tokenizer": {"eval": {}, "domain_token_saving": 0.0},
           "run": {"key": "abc123", "date": "2026-01-02 03:04:05 +0000", "evaluate": "def456", "evaluated": None,
                   "recipe": "demo", "recipe_path": "/r/demo.yaml", "workdir": "/w"}}
    md = render_markdown(doc)
    assert md.split("\n")[2] == f"**{doc['verdict']['sentence']}**"
    assert "- Run: report abc123, built 2026-01-02 03:04:05 +0000; scores from evaluate def456\n" in md
    assert "- Recipe: demo (/r/demo.yaml)\n" in md and "- Exports: /w/export/latest once the export stage has run" \
        " (it runs after the report); `slmforge path export --recipe /r/demo.yaml` prints the folder" in md
    assert "| slmforge_qa · exact_match | 0.000 ⚠ | 0.020 | 0.000 ⚠ |  |" in md  # shown, flagged, not a dash
    assert "- qa exact_match = 0.000 — for specialist, generalist: each model never produced an answer matching the " \
           "reference on any of the 100 items (a measured zero, not a missing score)" in md
    page = render_html(doc)
    assert page.index("class='verdict'") < page.index("<th>Run</th>") < page.index("Quality gate" if m["gate"] else
                                                                                    "<h2>Flags</h2>")
    assert page.count("<td class='zero'") == 2 and "<code>slmforge path export --recipe /r/demo.yaml</code>" in page
