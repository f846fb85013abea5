"""What this machine can do: bf16 support, the accelerators' datasheet peaks, the CPU's measured
matmul peak (the FLOP/s probe), the peak a training run's MFU is reckoned against, and the
FLOPs a transformer spends per trained token."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# bf16 dense tensor-core peak, FLOP/s, from the vendors' datasheets/whitepapers; NVIDIA prints the
# figure "with sparsity" too, which is twice these. GeForce cards: FP16/BF16 with FP32 accumulate.
DEVICES: dict[str, float] = {
    "rtx3090": 71e12,     # NVIDIA Ampere GA102 GPU architecture whitepaper: RTX 3090, 71 TFLOPS (142 sparse)
    "rtx4090": 165e12,    # NVIDIA Ada Lovelace GPU architecture whitepaper: RTX 4090, 165.2 TFLOPS (330.3 sparse)
    "l4": 121e12,         # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity -> 121 dense
    "a100": 312e12,       # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)
    "h100": 989e12,       # NVIDIA H100 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense
    "h100-pcie": 756e12,  # NVIDIA H100 PCIe datasheet: BF16 Tensor Core 1,513 TFLOPS with sparsity -> 756 dense
    "h200": 989e12,       # NVIDIA H200 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense
}
CPU = "cpu"  # not a table entry: measured on this machine by probe_peak_flops()


def resolve_device(spec: str, key: str = "device") -> str:
    """A `device:` setting made concrete: auto is cuda where a GPU is visible, else cpu; cuda[:N] must
    name a visible GPU, else a UserError naming `key` (the CLI's exit 2)."""
    import torch

    from slmforge.errors import UserError

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(spec.split(":")[1]) if ":" in spec else 0
        if idx >= n:
            seen = "no GPU is visible" if n == 0 else f"only {n} GPU(s) are visible"
            raise UserError(f"{key}: {spec!r}, but {seen} (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set {key}: auto or cpu")
    return spec


def auto_batch(spec: int | str, device: str, cpu: int, gpu: int) -> int:
    """A batch setting that may say `auto` made concrete: `cpu` on the CPU (each setting's CPU default
    before `auto` existed, so CPU runs are unchanged), `gpu` on a GPU, where a step's cost barely grows with
    rows until memory or compute is full (not measured here: no GPU). A number is taken as it is."""
    if spec != "auto":
        return int(spec)
    return cpu if device == "cpu" else gpu


def use_bf16(precision: str) -> bool:
    """`precision` is auto | bf16 | fp32; auto means bf16 where the hardware runs it natively."""
    import torch

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # AVX512-BF16 / AMX: oneDNN runs bf16 matmuls natively (both peaks: benchmarks/pretrain_throughput.py)
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def probe_peak_flops(seconds: float = 2.0, sizes: tuple[int, ...] = (1024, 2048)) -> dict:
    """This machine's CPU matmul speed: square n×n matmuls (2·n³ FLOPs each) in fp32 and bf16, best of
    3 repeats per size, about `seconds` in all. Returns {"bf16": FLOP/s, "fp32": FLOP/s, ...}."""
    import torch

    budget = seconds / (2 * len(sizes) * 3)  # per (dtype, size, repeat)
    best: dict[str, float] = {}
    # a CPU without native bf16 (AVX2 only) emulates it, orders of magnitude slower than fp32, so its bf16
    # figure comes from a small size (seen at commit accde65 on such a machine; not re-measured since)
    native_bf16 = use_bf16("auto")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in (sizes if name == "fp32" or native_bf16 else (256,)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up
            t0 = time.perf_counter()
            torch.mm(a, b)
            iters = max(1, int(budget / max(time.perf_counter() - t0, 1e-6)))
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch.mm(a, b)
                rate = 2 * n**3 * iters / (time.perf_counter() - t0)
                best[name] = max(best.get(name, 0.0), rate)
    return {**best, "sizes": list(sizes), "threads": torch.get_num_threads()}


def peak_cache() -> Path:
    """$SLMFORGE_PEAK_CACHE, else ~/.cache/slmforge/peak_flops.json."""
    env = os.environ.get("SLMFORGE_PEAK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slmforge" / "peak_flops.json"


def machine_key() -> str:
    """What the CPU peak depends on: the processor, the threads torch uses, torch's version."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__.split('+')[0]}"


def cpu_peak(refresh: bool = False) -> dict:
    """This CPU's matmul peak, probed once (3 s) and then read from peak_cache() for every later run, so
    MFU figures do not move with the load the machine had when a run started (a 1-second probe per run
    gave the same demo MFUs 20 points apart, at commit 6e03195). `refresh` probes again and keeps the
    higher figure: a probe on a busy machine can only come out low. Returns probe_peak_flops()'s dict
    with `key`, `measured` (date) and `cached`."""
    path, key = peak_cache(), machine_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    old = cache.get(key)
    if old and not refresh:
        return {**old, "key": key, "cached": True}
    new = probe_peak_flops(seconds=3.0)
    if old:
        new = {k: max(old.get(k, 0), v) if k in ("bf16", "fp32") else v for k, v in new.items()}
    entry = {**new, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the figure is still right for this run
    return {**entry, "key": key, "cached": False}


def peak_flops(bf16: bool) -> float:
    """bf16 (or fp32) matmul peak of this machine: the GPU's datasheet figure (fp32 taken as half of
    it; 0 for a GPU not in DEVICES), or on CPU cpu_peak(), measured once per machine."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace(" ", "")
        for key in sorted(DEVICES, key=len, reverse=True):
            if key.replace("-", "") in name:
                return DEVICES[key] if bf16 else DEVICES[key] / 2
        return 0.0
    probe = cpu_peak()
    return probe["bf16"] if bf16 else probe["fp32"]


def plausible_mfu(flops_per_s: float, peak: float) -> float | None:
    """flops_per_s / peak, or None when there is no peak or the share would pass 100% (the peak was
    measured low, e.g. on a busy machine: delete peak_cache() and it is measured again)."""
    if not peak:
        return None
    share = flops_per_s / peak
    return share if share <= 1.0 else None


def flops_per_token(shape_: dict, seq: int) -> float:
    """6N for the weights (the tied LM head included) + 12 * layers * width * seq for attention (PaLM)."""
    return 6 * shape_["params"] + 12 * shape_["depth"] * shape_["hidden_size"] * seq


def training_memory(params: int, shape_: dict, vocab: int, micro_batch: int, seq: int, checkpointing: bool) -> dict:
    """Estimated peak bytes of one training process, by part: float32 weights, gradients and AdamW's two
    moments (16 bytes a parameter) and autocast's bf16 copies (2); activations, about 34 bytes per token,
    layer and unit of width (Korthikanti et al. 2022, attention scores not stored: SDPA), or only each
    layer's input with gradient checkpointing; the logits of a micro-batch over the whole vocabulary (bf16,
    their float32 copy, its log-softmax and gradients: 16 bytes each); 1 GB for the runtime. Checked on
    SmolLM2-135M at 8 x 1024 tokens per micro-batch against the process's resident memory (issue 27's
    report of 14-17 GB; this says 14.7)."""
    tokens = micro_batch * seq
    layers, width = shape_["depth"], shape_["hidden_size"]
    act = tokens * layers * width * (2 if checkpointing else 34) + (tokens * width * 34 if checkpointing else 0)
    parts = {"weights, gradients, AdamW": 18 * params, "activations": act, "logits": 16 * tokens * vocab,
             "runtime": 1 << 30}
    return {**parts, "total": sum(parts.values())}


def memory_advice(est: dict, micro_batch: int, seq: int, checkpointing: bool, available: int) -> str | None:
    """A warning when the estimate passes 80% of `available` bytes, naming the knobs that bring it down
    (None when it fits)."""
    if est["total"] < 0.8 * available:
        return None
    gb = {k: f"{v / 1e9:.1f}" for k, v in est.items()}
    knobs = [f"micro_batch (now {micro_batch}: activations and logits scale with it; the step's batch_tokens stay "
             "the same, in more forward passes)"]
    if not checkpointing:
        knobs.append("gradient_checkpointing: true (activations to about 1/17, ~30% more compute)")
    knobs.append(f"model.context (now {seq})")
    return (f"training may need about {gb['total']} GB (weights, gradients and AdamW {gb['weights, gradients, AdamW']}, "
            f"activations {gb['activations']}, logits {gb['logits']}) and {available / 1e9:.1f} GB is available; "
            "lower " + ", or ".join(knobs))


def memory_in_use() -> str:
    """'RSS 6.1 GB' (this process), or on a GPU the most torch has allocated: for progress lines."""
    import psutil
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.max_memory_allocated() / 1e9:.1f} GB"
    return f"RSS {psutil.Process().memory_info().rss / 1e9:.1f} GB"
