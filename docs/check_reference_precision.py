"""GPU check: the frozen reference equals the policy at step 0 on SD v1-5's UNet architecture (random weights, norms
perturbed away from 1 and 0) under bf16 and fp16 autocast. "old .to(dtype)" is the reference before the fix (norms
rounded); "frozen_reference" is train_kto's. Run from the repository root: python docs/check_reference_precision.py
(DEV=cpu N=1 S=8 for a quick CPU run); writes $OUT/bf16_check.json (OUT defaults to the current folder)."""

import copy
import functools
import json
import os
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

sys.path.insert(0, ".")
import fixtures  # noqa: E402
import train_kto  # noqa: E402

dev = torch.device(os.environ.get("DEV", "cuda"))
N, S = int(os.environ.get("N", 10)), int(os.environ.get("S", 64))
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config("configs/sd15/unet")).to(dev).train()
fixtures.perturb_norms(unet)
sched = DDPMScheduler.from_pretrained("configs/sd15", subfolder="scheduler")
out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    for how, ref in (
        ("frozen_reference", train_kto.frozen_reference(unet, dtype)),
        ("old .to(dtype)", copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)),
    ):
        loss_fn = functools.partial(train_kto.kto_loss, beta=5000.0)
        rs, zs, t0 = [], [], time.time()
        gen = torch.Generator(dev).manual_seed(1)
        for i in range(N):
            x0 = torch.randn(2, 4, S, S, generator=gen, device=dev)
            emb = torch.randn(2, 77, 768, generator=gen, device=dev).to(dtype)
            cond, rolled = dict(encoder_hidden_states=emb), dict(encoder_hidden_states=emb.flip(0))
            with torch.autocast(dev.type, dtype=dtype):
                desirable = torch.tensor([True, False], device=dev)
                loss, st = train_kto.kto_step(unet, ref, sched, x0, cond, rolled, desirable, gen, loss_fn)
            rs.append(st["r"])
            zs.append(st["z"].item())
        r = torch.cat(rs)
        row = dict(
            max_abs_r=r.abs().max().item(),
            std_r=r.std().item(),
            beta_std_r=5000 * r.std().item(),
            max_z=max(zs),
            loss_first=loss.item(),
            seconds=round(time.time() - t0, 1),
        )
        out[f"{name} {how}"] = row
        print(name, how, row, flush=True)
        del ref
json.dump(out, open(os.environ.get("OUT", ".") + "/bf16_check.json", "w"), indent=2)
