import json
import math

import torch

from slmforge.stages.evaluate import bits_per_byte
from tests.conftest import slmforge, small_recipe, write_recipe


def _tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_bits_per_byte_matches_a_hand_computation(tmp_path, small_corpus):
    from slmforge.stages.tokenizer import save_hf, train_bpe

    texts = [json.loads(x)["text"] for x in small_corpus["domain"].read_text().splitlines()[:5]]
    save_hf(train_bpe(iter(texts), 400), tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    model = _tiny_model(len(tok))
    with torch.no_grad():  # zero output layer: uniform predictions, log2(V) bits for every token
        model.lm_head.weight.zero_()
    texts = texts[:2]
    r = bits_per_byte(model, tok, texts, context=64, batch_size=3)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["tokens"] == n_tokens and r["bytes"] == n_bytes
    assert math.isclose(r["bpb"], n_tokens * math.log2(len(tok)) / n_bytes, rel_tol=1e-3)
    assert math.isclose(r["ppl"], len(tok), rel_tol=1e-3)
    assert bits_per_byte(model, tok, texts, context=32, batch_size=1)["bpb"] == r["bpb"]  # windows don't matter here


def test_evaluate_scores_twice_the_same_and_writes_a_report(tmp_path, small_corpus):
    recipe = write_recipe(tmp_path, small_recipe(small_corpus, tmp_path / "w", with_model=True))
    r = slmforge("run", str(recipe))
    assert r.returncode == 0, r.stderr
    assert "bits per byte" in r.stdout and "better than the generalist" in r.stdout
    [run] = [p for p in (tmp_path / "w" / "evaluate").iterdir() if p.is_dir()]
    m = json.loads((run / "manifest.json").read_text())["metrics"]
    assert set(m["scores"]) == {"specialist", "generalist"} and set(m["scores"]["specialist"]) == {"pg", "general"}
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Greedy samples" in page
    _screenshot_shows_the_charts(run / "report.html", tmp_path / "shot.png")
    assert "Domain benchmarks" in page and "domain benchmarks (lm-evaluation-harness)" in r.stdout
    tasks = {"slmforge_mcq", "slmforge_completion", "slmforge_qa", "slmforge_summarization"}
    assert set(m["benchmarks"]["specialist"]) == tasks and set(m["benchmarks"]["generalist"]) == tasks
    assert 0 <= m["benchmarks"]["specialist"]["slmforge_mcq"]["acc"] <= 1
    r2 = slmforge("evaluate", "--recipe", str(recipe), "--force")
    assert r2.returncode == 0, r2.stderr
    m2 = json.loads((run / "manifest.json").read_text())["metrics"]
    assert m2["scores"] == m["scores"] and m2["benchmarks"] == m["benchmarks"]
    model_dir = next((tmp_path / "w" / "pretrain").glob("*/specialist"))
    out = slmforge("chat", str(model_dir), "--prompt", "SELECT", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("SELECT")
    out = slmforge("chat", str(model_dir), "--prompt", "Hi", "--chat", "--sample", "--max-new-tokens", "5")
    assert out.returncode == 0 and out.stdout.startswith("Hi")


def _screenshot_shows_the_charts(page, png):
    """Render the report in headless Chromium and check the pictures are drawn, not just present."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "make test installs Debian's chromium; run: apt-get install -y chromium"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png.parent / 'chrome'}", "--hide-scrollbars", "--window-size=1000,2600",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = (abs(img[..., 0] - 31) < 30) & (abs(img[..., 1] - 119) < 30) & (abs(img[..., 2] - 180) < 30)
    orange = (abs(img[..., 0] - 255) < 30) & (abs(img[..., 1] - 127) < 30) & (abs(img[..., 2] - 14) < 40)
    assert blue.sum() > 2000 and orange.sum() > 2000, (blue.sum(), orange.sum())  # bars and curves drawn
