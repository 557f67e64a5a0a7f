"""PyTorch eager baseline for the ResNet-50 trunk that `poodle-train gpu-check --only trunk`
times: batch 8 at 512x1024, training-mode BatchNorm, forward and backward of the mean of C5,
cuDNN benchmark mode; fp32 (no TF32), TF32, bf16 autocast. One JSON line per precision."""
import json, sys, time
import torch, torchvision

torch.backends.cudnn.benchmark = True
dev = "cuda"


def bench(mode, iters=5, warm=2):
    torch.backends.cuda.matmul.allow_tf32 = mode != "f32"
    torch.backends.cudnn.allow_tf32 = mode != "f32"
    r = torchvision.models.resnet50()
    trunk = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4).to(dev).train()
    x = torch.randn(8, 3, 512, 1024, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            c5 = trunk(x)
        c5.float().mean().backward()
        trunk.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / iters
    return {"kind": "trunk", "impl": "torch", "precision": mode, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0), "batch": 8, "res": [512, 1024], "step_s": s,
            "img_per_s": 8 / s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["f32", "tf32", "bf16"]:
        try:
            print(json.dumps(bench(mode)), flush=True)
        except Exception as e:  # an OOM on a smaller card is a result, not a crash
            print(json.dumps({"kind": "trunk", "impl": "torch", "precision": mode, "error": repr(e)[:300]}), flush=True)
        torch.cuda.empty_cache()
