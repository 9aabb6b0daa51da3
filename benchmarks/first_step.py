"""``python -m benchmarks.first_step CONTENDER WORKLOAD_JSON DEVICE``: time one contender's first
step (compile included) in this fresh process and print ``{"seconds": ...}`` as the last line."""

from __future__ import annotations

import json
import sys
import time

import torch

from .contenders import Unavailable, by_name
from .workloads import Workload


def main(contender_name: str, spec: str, device: str) -> None:
    fields = json.loads(spec)
    workload = Workload(fields["name"], tuple(tuple(s) for s in fields["shapes"]),
                        getattr(torch, fields["dtype"].removeprefix("torch.")), fields["amsgrad"])
    (contender,) = by_name([contender_name])
    params = workload.make(device)
    try:
        built = contender.build(params, workload)
    except Unavailable as reason:
        print(json.dumps({"unavailable": f"unavailable: {reason}"}))
        return
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    built.step()
    if device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(*sys.argv[1:])
