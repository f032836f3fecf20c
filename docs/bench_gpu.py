"""GPU benchmarks of train_kto.py for docs/benchmarks.md: images/s, peak memory, TFLOP/s and utilisation per setting.

Each setting is a real training run, train_kto.main() in this process with --profile, on SD v1-5's architecture
with random weights (`python fixtures.py sd15-random`, built into <out> on first use) and the tiny dataset upscaled to 512 px
(the images' content does not matter for speed). Figures are means over steps 3 to --steps; the first two steps'
seconds are reported apart (warm-up, and compilation with --compile). One JSON line per setting is appended to
<out>/bench.jsonl as it finishes, so a run cut short keeps what it measured. Run from the repository root:

    python docs/bench_gpu.py --out runs/bench                 # every setting (about 8 minutes on an H200)
    python docs/bench_gpu.py --out runs/bench --only b8 b8-compile
    python docs/bench_gpu.py --out runs/bench --fusion        # also: reference matched + mismatched in one call?
    python docs/bench_gpu.py --out runs/bench --layouts --only  # channels-last UNets, cuDNN autotuning: faster?
    python docs/bench_gpu.py --out runs/bench-sdxl --model sdxl-random --resolution 1024 --only b1-gc-mean b1-lora-mean
"""

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import fixtures  # noqa: E402
import models  # noqa: E402
import reports  # noqa: E402
import train_kto  # noqa: E402

# name: (per-GPU batch, extra flags). All: kl_mismatched, bf16 autocast, fused AdamW, 512 px
SETTINGS = {
    "b2": (2, ["--cache_latents"]),
    "b4": (4, ["--cache_latents"]),
    "b8": (8, ["--cache_latents"]),
    "b16": (16, ["--cache_latents"]),
    "b32": (32, ["--cache_latents"]),
    "b64": (64, ["--cache_latents"]),
    "b8-no-cache": (8, []),
    "b2-no-cache": (2, []),
    "b8-gc": (8, ["--cache_latents", "--gradient_checkpointing"]),
    "b32-gc": (32, ["--cache_latents", "--gradient_checkpointing"]),
    "b64-gc": (64, ["--cache_latents", "--gradient_checkpointing"]),
    "b128-gc": (128, ["--cache_latents", "--gradient_checkpointing"]),
    "b2x4": (2, ["--cache_latents", "--gradient_accumulation_steps", "4"]),
    "b8-batch-mean": (8, ["--cache_latents", "--reference_point", "batch_mean"]),
    "b8-compile": (8, ["--cache_latents", "--compile"]),
    "b64-compile": (64, ["--cache_latents", "--compile"]),
    "b2-fp32": (2, ["--cache_latents", "--mixed_precision", "no"]),
    "b8-fp32": (8, ["--cache_latents", "--mixed_precision", "no"]),
    # SDXL (--model sdxl-random --resolution 1024): batch 1 has no mismatched partner, so its z is the batch mean
    "b1-gc-mean": (1, ["--cache_latents", "--gradient_checkpointing", "--reference_point", "batch_mean"]),
    "b1-lora-mean": (1, ["--cache_latents", "--lora_rank", "8", "--reference_point", "batch_mean"]),
    "b2-gc": (2, ["--cache_latents", "--gradient_checkpointing"]),
    "b2-lora": (2, ["--cache_latents", "--lora_rank", "8"]),
    "b2-lora-gc": (2, ["--cache_latents", "--lora_rank", "8", "--gradient_checkpointing"]),
}


def run_setting(name: str, model: str, data: str, resolution: int, out: Path, steps: int) -> dict:
    batch, flags = SETTINGS[name]
    folder = out / name
    argv = [
        "--pretrained_model",
        model,
        "--dataset",
        data,
        "--resolution",
        str(resolution),
        "--train_batch_size",
        str(batch),
        "--max_train_steps",
        str(steps),
        "--lr_warmup_steps",
        "1",
        "--checkpointing_steps",
        "100000",
        "--validation_steps",
        "0",
        "--dataloader_workers",
        "4",
        "--profile",
        "--output_dir",
        str(folder),
        "--cache_dir",
        str(out / f"latent_cache-{resolution}-{'fp32' if 'no' in flags else 'amp'}"),
        *flags,
    ]
    shutil.rmtree(folder, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = dict(setting=name, batch=batch, flags=" ".join(flags))
    try:
        # no checkpoint is written (main() turns saving off), so the "done: checkpoint-N" line names none
        train_kto.main(argv)
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if "error" in result:
        return result
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:]
    images = batch * (
        int(flags[flags.index("--gradient_accumulation_steps") + 1])
        if "--gradient_accumulation_steps" in flags
        else 1
    )
    seconds = [images / r["images_per_sec"] for r in rows]
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    result.update(
        images_per_sec=round(mean("images_per_sec"), 2),
        seconds_per_step=round(sum(seconds[2:]) / len(steady), 4),
        first_two_steps_seconds=[round(s, 2) for s in seconds[:2]],
        step_seconds=[round(s, 3) for s in seconds],
        max_memory_gb=round(max(r.get("max_memory_gb", 0) for r in rows), 1),
        tflop_per_step=round(rows[0]["flops_per_step"] / 1e12, 2),
        tflops_per_sec=round(mean("tflops_per_sec"), 1),
        utilization=round(mean("utilization"), 4) if "utilization" in rows[0] else None,
        phases_ms={k[5:]: round(1000 * mean(k), 1) for k in rows[0] if k.startswith("time_")},
    )
    return result


def fusion(model: str, batches=(2, 8), repeats: int = 20) -> list[dict]:
    """Could the reference's matched and mismatched passes be one call of twice the batch? Times one call of 2B
    against two calls of B (bf16 autocast, no gradient) and checks whether the first half of the 2B call is
    bitwise the B call (if not, the reference would no longer equal the policy exactly at step 0)."""
    from diffusers import UNet2DConditionModel

    policy = UNet2DConditionModel.from_pretrained(model, subfolder="unet").cuda()
    ref = train_kto.frozen_reference(policy, torch.bfloat16)
    rows = []
    for b in batches:
        x = torch.randn(2 * b, 4, 64, 64, device="cuda")
        t = torch.randint(0, 1000, (2 * b,), device="cuda")
        c = torch.randn(2 * b, 77, 768, device="cuda")

        def timed(fn):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / repeats * 1000

        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            two = timed(lambda: (ref(x[:b], t[:b], c[:b]).sample, ref(x[b:], t[b:], c[b:]).sample))
            one = timed(lambda: ref(x, t, c).sample)
            same = torch.equal(ref(x, t, c).sample[:b], ref(x[:b], t[:b], c[:b]).sample)
        rows.append(
            dict(
                setting=f"fusion-b{b}",
                two_calls_ms=round(two, 2),
                one_call_ms=round(one, 2),
                first_half_bitwise_equal=same,
            )
        )
    return rows


def layouts(model: str, batch: int = 8, repeats: int = 10):
    """Would channels-last UNets or cuDNN's autotuner (torch.backends.cudnn.benchmark) make the step faster, eager
    and compiled, and keep r exactly 0 at step 0? And what does --compile's eager-like rounding (inductor's
    emulate_precision_casts, models.compile_blocks) cost against inductor's own? Times kto_step (kl_mismatched,
    bf16 autocast; its forwards and the policy's backward, no optimizer) on random latents and captions, SD
    v1-5-shaped models only. Compiled variants come last (compilation is in place); their first call's seconds
    are the compilation."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device).train()
    ref = train_kto.frozen_reference(policy, torch.bfloat16)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    c = policy.config
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen, device=device)
    emb = torch.randn(batch, 77, c.cross_attention_dim, generator=gen, device=device)
    cond, rolled = dict(encoder_hidden_states=emb), dict(encoder_hidden_states=emb.roll(1, 0))
    desirable = torch.arange(batch, device=device) % 5 != 4
    step = train_kto.objective(train_kto.Config(), torch.Tensor.backward)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    compiled_as = None  # None: eager; else the emulate_precision_casts the blocks were compiled with
    for name, channels_last, autotune, compiled, emulate in [
        ("default", False, False, False, None),
        ("cudnn-benchmark", False, True, False, None),
        ("channels-last", True, False, False, None),
        ("channels-last+cudnn-benchmark", True, True, False, None),
        ("compiled", False, False, True, True),
        ("compiled+channels-last+cudnn-benchmark", True, True, True, True),
        ("compiled-inductor-rounding", False, False, True, False),
    ]:
        torch.backends.cudnn.benchmark = autotune
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        policy.to(memory_format=fmt), ref.to(memory_format=fmt)
        if compiled and compiled_as != emulate:
            torch._dynamo.reset()  # compile afresh: the setting is read when inductor compiles (the first call)
            models.compile_blocks(policy, ref)
            torch._inductor.config.emulate_precision_casts = compiled_as = emulate
        seconds = []
        for _ in range(3 + repeats):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, out = step(policy, ref, scheduler, x0, cond, rolled, desirable, gen)
            policy.zero_grad(set_to_none=True)
            sync()
            seconds.append(time.perf_counter() - t0)
        yield dict(
            setting=f"layout-b{batch}-{name}",
            ms_per_step=round(1000 * sum(seconds[3:]) / repeats, 1),
            first_call_seconds=round(seconds[0], 2),
            r_exactly_zero=bool((out["r"] == 0).all()),
        )
    torch.backends.cudnn.benchmark = False


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="runs/bench", help="folder for bench.jsonl and the runs (default: %(default)s)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=list(SETTINGS),
        help="these settings only; none with --only alone (default: all)",
    )
    parser.add_argument(
        "--steps", type=int, default=8, help="optimizer steps per setting (default: %(default)s)"
    )
    parser.add_argument("--fusion", action="store_true", help="also time the reference's passes as one call")
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="also time the step with channels-last UNets and cuDNN autotuning",
    )
    parser.add_argument(
        "--model",
        default="sd15-random",
        help="model folder (default: %(default)s, SD v1-5 with random weights, built into <out>/sd15-random on "
        "first use; sdxl-random: SDXL base 1.0's architecture, likewise; a tiny model rehearses this script on a CPU)",
    )
    parser.add_argument(
        "--resolution", type=int, default=512, help="image side in pixels (default: %(default)s)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model in ("sd15-random", "sdxl-random"):
        t0, name, model = time.perf_counter(), model, str(out / model)
        if not Path(model).exists():
            # random initialisation of 1.07 B (SDXL: 3.5 B) parameters: seconds on a GPU, minutes on a CPU
            with torch.device("cuda"):
                fixtures.main([name, model])
        print(f"{name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    data = str(fixtures.tiny_dataset_path())
    # speed only: no 4 GB checkpoint, model card or curves at the end of each setting
    checkpoints.save_checkpoint = lambda *args, **kwargs: None
    reports.Reports.checkpoint = lambda self, step: None
    with open(out / "bench.jsonl", "a") as record:

        def keep(row):
            print(json.dumps(row), flush=True)
            record.write(json.dumps(row) + "\n")
            record.flush()

        for row in fusion(model) if args.fusion else []:
            keep(row)
        for row in layouts(model) if args.layouts else []:
            keep(row)
        for name in SETTINGS if args.only is None else args.only:
            keep(run_setting(name, model, data, args.resolution, out, args.steps))


if __name__ == "__main__":
    main()
