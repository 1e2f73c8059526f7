"""GPU: images/s, peak allocated memory and model FLOP utilisation (MFU) of one training step of the
U-Net at width 64 on 512x1024 crops: fp32, bf16 autocast, + channels_last, + torch.compile.

    .venv/bin/python benchmarks/gpu.py [--quick] [--repeats 3] [--batch 4] [--peak-tflops N]

Batches are random tensors already on the device (no loader: this is the compute ceiling the input
pipeline has to feed; see bench_loader.py). The step is the loop's: autocast forward, cross-entropy on
float logits, backward, gradient clipping, AdamW. MFU = FLOPs of forward + backward (counted by
torch.utils.flop_counter) x images/s / the device's dense bf16 peak. Without CUDA it prints the FLOP
count and "no CUDA device: skipped".
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12,
             "A10": 125e12, "L4": 121e12}  # dense tensor-core FLOP/s (datasheets)


def peak_for(name: str, override: float) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="images per step (jobs/configs/cityscapes.yaml: 4 per GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak of the device, if not known")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = p.parse_args()
    t_start = C.header("GPU: U-Net width 64, one training step", args)

    import torch

    from unet_dist import labels
    from unet_dist.model import UNet

    size = (256, 512) if args.quick else (512, 1024)
    fwd, train = C.unet_flops(64, size)
    print(f"**FLOPs per image, U-Net width 64, depth 5, {size[0]}x{size[1]}** "
          "(torch.utils.flop_counter, meta device)\n")
    print("| pass | GFLOP |\n|---|---|")
    print(f"| forward | {fwd / 1e9:.0f} |\n| forward + backward (one training image) | {train / 1e9:.0f} |\n")
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (run this script on a GPU machine for images/s, memory and MFU)")
        C.footer(t_start)
        return

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_for(name, args.peak_tflops)
    steps = 3 if args.quick else 20
    torch.backends.cudnn.benchmark = True
    variants = [("fp32", None, False, False), ("bf16 autocast", torch.bfloat16, False, False),
                ("bf16 + channels_last", torch.bfloat16, True, False)]
    if not args.no_compile:
        variants.append(("bf16 + channels_last + compile", torch.bfloat16, True, True))
    rates: dict[str, list[float]] = {}
    mem: dict[str, float] = {}
    for label, dtype, cl, comp in variants:
        torch.manual_seed(0)
        model = UNet(3, 19, 64, 5, "same", True).to(dev)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fn = torch.compile(model) if comp else model
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=labels.IGNORE)
        x = torch.randn(args.batch, 3, *size, device=dev)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 19, (args.batch, *size), device=dev)

        def step(fn=fn, x=x, y=y, model=model, opt=opt, loss_fn=loss_fn, dtype=dtype):
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(fn(x).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(5 if comp else 3):  # warm-up: cudnn autotune, compilation
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            rates.setdefault(label, []).append(steps * args.batch / (time.perf_counter() - t0))
        mem[label] = torch.cuda.max_memory_allocated() / 2**30
        del model, opt, fn, x, y
        torch.cuda.empty_cache()

    t = C.Table(f"{name}: training step, batch {args.batch}, {size[0]}x{size[1]}, {steps} steps per repeat",
                "images/s", baseline="fp32")
    for label, *_ in variants:
        note = f"peak allocated {mem[label]:.1f} GiB"
        if peak:
            note += f"; MFU {C.median(rates[label]) * train / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
        t.add(label, rates[label], note)
    t.print()
    if peak is None:
        print("MFU: unknown peak for this device; pass --peak-tflops")
    C.footer(t_start)


if __name__ == "__main__":
    main()
