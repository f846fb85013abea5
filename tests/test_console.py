"""Progress and logs off a terminal, other libraries' output sent to the run's log, the cached CPU peak."""

import logging
import os
import subprocess
import sys
import textwrap

from slmforge import console, hardware


def test_off_terminal_progress_is_plain_lines_with_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setenv("SLMFORGE_PROGRESS_SECONDS", "0")
    assert not console.console.is_terminal
    with console.progress("pretrain · specialist", 4, "steps") as bar:
        for step in range(1, 5):
            bar.update(completed=step, rate=(1234.5, "tok/s"), loss=f"loss {5 - step:.3f}")
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("pretrain")]
    assert "\r" not in err and "\x1b" not in err
    assert len(lines) == 4  # one per update (interval 0); the closing line would repeat the last: not printed
    assert lines[1] == lines[1].strip() and "2/4 steps (50%)" in lines[1] and "1,234 tok/s" in lines[1]
    assert "ETA" in lines[1] and "loss 3.000" in lines[1]
    assert "4/4 steps (100%)" in lines[-1] and "loss 1.000" in lines[-1]


def test_off_terminal_lines_are_throttled(capsys, monkeypatch):
    monkeypatch.setenv("SLMFORGE_PROGRESS_SECONDS", "3600")
    with console.progress("synth · extractive", 1000, "chunks") as bar:
        for _ in range(1000):
            bar.update(advance=1)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("synth")]
    assert len(lines) == 1 and "1,000/1,000 chunks (100%)" in lines[0]


def test_wide_tables_are_not_cut_off_a_terminal(tmp_path):
    """A table wider than 80 columns keeps its cells whole when stderr is a file (CI, `make demo > log`)."""
    code = textwrap.dedent("""
        from rich.table import Table
        from slmforge.console import console
        t = Table()
        for c in ("model", "parameters", "training tokens", "domain epochs", "tokens per second", "time"):
            t.add_column(c)
        t.add_row("specialist-with-a-long-name", "2.90M", "2,187,264", "1.19", "12,501", "175 s")
        console.print(t)
    """)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr
    assert "specialist-with-a-long-name" in err and "tokens per second" in err and "…" not in err


def test_stage_output_sends_other_libraries_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "evaluate.log"
    lib = logging.getLogger("some_library")
    handler = logging.StreamHandler(sys.stderr)  # made before, as libraries do at import
    lib.addHandler(handler)
    try:
        with console.stage_output(log):
            print("{'loss': 1.23, 'grad_norm': 0.5}")
            print("Running loglikelihood requests: 10%|#", end="\r", file=sys.stderr)
            lib.warning("Both `max_new_tokens` and `max_length` seem to have been set.")
            os.write(2, b"from a forked worker\n")
            console.info("  evaluate · ours")
            console.results.print("bits per byte table")
        console.info("after")
    finally:
        lib.removeHandler(handler)
    out, err = capfd.readouterr()
    text = log.read_text()
    for noise in ("'loss': 1.23", "Running loglikelihood", "max_new_tokens", "from a forked worker"):
        assert noise in text and noise not in out + err
    assert "evaluate · ours" in err and "after" in err and "ours" not in text
    assert "bits per byte table" in out and "table" not in text
    with console.stage_output(log):  # appended, with a header per build
        print("second")
    assert text in log.read_text() and log.read_text().count("====") == 4


def test_cpu_peak_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMFORGE_PEAK_CACHE", str(tmp_path / "peak.json"))
    calls = []

    def probe(seconds=2.0, sizes=(1024, 2048)):
        calls.append(seconds)
        return {"bf16": 4e11 * len(calls) ** -1, "fp32": 2e11, "sizes": [8], "threads": 2}

    monkeypatch.setattr(hardware, "probe_peak_flops", probe)
    first = hardware.cpu_peak()
    assert not first["cached"] and first["bf16"] == 4e11 and len(calls) == 1
    again = hardware.cpu_peak()
    assert again["cached"] and again["bf16"] == 4e11 and len(calls) == 1  # no probe: the same figure
    assert hardware.peak_flops(bf16=True) == 4e11 and len(calls) == 1
    refreshed = hardware.cpu_peak(refresh=True)  # a second probe came out lower (a busy machine): kept the max
    assert len(calls) == 2 and refreshed["bf16"] == 4e11


def test_mfu_is_never_above_100_percent():
    assert hardware.plausible_mfu(2e11, 4e11) == 0.5
    assert hardware.plausible_mfu(5e11, 4e11) is None
    assert hardware.plausible_mfu(1e11, 0.0) is None


def test_stage_output_keeps_our_lines_on_a_stand_in_stderr(tmp_path, capsys):
    """Under capsys (or in a notebook) sys.stderr is not fd 2: our lines still reach it."""
    with console.stage_output(tmp_path / "x.log"):
        console.info("  sft · ours")
        print("library noise")
    out, err = capsys.readouterr()
    assert "sft · ours" in err and "library noise" not in out + err
    assert "library noise" in (tmp_path / "x.log").read_text()


def test_slow_items_show_seconds_per_item(monkeypatch):
    bar = console.Bar("evaluate", 6, "models")
    monkeypatch.setattr(console.time, "time", lambda: bar._t0 + 50.0)
    bar.update(completed=2)
    assert "25.0 s/model" in bar.line() and "models/s" not in bar.line()


def test_a_silent_bar_still_prints_a_line_every_heartbeat(capsys, monkeypatch):
    """A training step longer than the heartbeat (a 135M DAPT step of 8 x 1024 tokens took ~30 s) still
    gets a line with the elapsed time, from the bar's own thread."""
    import time

    monkeypatch.setenv("SLMFORGE_PROGRESS_SECONDS", "3600")
    monkeypatch.setenv("SLMFORGE_HEARTBEAT_SECONDS", "1")
    with console.progress("pretrain · specialist", 10, "steps") as bar:
        bar.update(completed=1, tokens="0.01M tokens", memory="RSS 1.0 GB")
        time.sleep(3.5)  # one step that takes long
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("pretrain")]
    assert len(lines) >= 3, lines  # heartbeats, then the last line
    assert all("1/10 steps (10%)" in x and "RSS 1.0 GB" in x for x in lines)
    assert lines[0] != lines[-1]  # the elapsed time moves


def test_the_memory_estimate_names_the_knobs_that_bring_it_down():
    shape = {"depth": 30, "hidden_size": 576}
    big = hardware.training_memory(134_515_008, shape, 49152, 8, 1024, False)
    small = hardware.training_memory(134_515_008, shape, 49152, 2, 1024, False)
    ckpt = hardware.training_memory(134_515_008, shape, 49152, 8, 1024, True)
    assert 13e9 < big["total"] < 16e9  # SmolLM2 at 8 x 1024 held 14-17 GB
    assert small["total"] < big["total"] / 2 and ckpt["activations"] < big["activations"] / 10
    said = hardware.memory_advice(big, 8, 1024, False, available=16 * 2**30)
    assert said and "micro_batch (now 8" in said and "gradient_checkpointing: true" in said and "context (now 1024)" \
        in said and "logits 6.4" in said
    assert hardware.memory_advice(small, 2, 1024, False, available=24 * 2**30) is None
    assert "gradient_checkpointing" not in hardware.memory_advice(ckpt, 8, 1024, True, available=2**30)


def test_a_heartbeat_inside_a_slow_item_keeps_the_rate_and_counts_the_eta_down(monkeypatch):
    """evaluate: 1 of 4 models done in 100 s, then 60 s into the second: the rate stays 100 s per model
    (not 160) and the ETA is 300 - 60 = 240 s (not 480)."""
    now = [1000.0]
    monkeypatch.setattr(console.time, "time", lambda: now[0])
    bar = console.Bar("evaluate", 4, "models")
    now[0] += 100
    bar.update(completed=1)
    assert "100.0 s/model" in bar.line() and "ETA 5:00" in bar.line()
    now[0] += 60
    line = bar.line()
    assert "100.0 s/model" in line and "2:40 elapsed, ETA 4:00" in line, line
    now[0] += 400  # slower than the rate so far: the ETA stops at 0 rather than going negative
    assert "ETA 0:00" in bar.line()
