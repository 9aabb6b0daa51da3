"""The param lists that the benchmarks step: shapes, dtype and options, scaled to the machine."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Workload", "gpt2_shapes", "scaling_workloads", "standard_workloads"]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    amsgrad: bool = False

    @property
    def elements(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    @property
    def bytes_per_step(self) -> int:
        """Bytes an ideal step moves: read param, grad and the state, write param and the state
        (28 B per fp32 element, 36 with AMSGrad); state is kept in the params' dtype."""
        buffers = (5 + 4) if self.amsgrad else (4 + 3)
        return buffers * self.elements * torch.empty((), dtype=self.dtype).element_size()

    def make(self, device: str, seed: int = 0) -> list[torch.Tensor]:
        """Fresh params with random grads, the same values for every contender."""
        generator = torch.Generator().manual_seed(seed)
        params = []
        for shape in self.shapes:
            p = torch.randn(shape, generator=generator).to(device=device, dtype=self.dtype)
            p.grad = torch.randn(shape, generator=generator).to(device=device, dtype=self.dtype)
            params.append(p)
        return params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def gpt2_shapes(vocab: int, width: int, layers: int, context: int = 1024) -> tuple[tuple[int, ...], ...]:
    """GPT-2's parameter list (GPT-2 small is vocab 50257, width 768, 12 layers: 148 tensors)."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return tuple(shapes + [(width,), (width,)])


def standard_workloads(scale: float = 1.0, *, full_gpt2: bool = False) -> list[Workload]:
    """One large tensor, a GPT-2-shaped list and 1,000 small tensors, in fp32 and bf16, plus AMSGrad
    on the large one. ``scale`` shrinks every size (tests use a tiny one). The GPT-2 list is
    GPT-2 small's 148 tensors with narrower layers (14M elements) unless ``full_gpt2`` (124M, for
    a GPU)."""
    large = (max(16, int(16 * 2**20 * scale)),)
    if full_gpt2:
        gpt2 = gpt2_shapes(vocab=50257, width=768, layers=12)
    else:
        width = max(8, int(256 * scale**0.5) // 8 * 8)
        gpt2 = gpt2_shapes(vocab=max(16, int(16384 * scale**0.5)), width=width, layers=12,
                           context=max(8, int(1024 * scale**0.5)))
    small = tuple((max(16, int(1024 * scale)),) for _ in range(1000 if scale >= 0.01 else 20))
    small_name = f"{len(small)}x{small[0][0]}"
    workloads = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        workloads += [Workload(f"large-{tag}", (large,), dtype), Workload(f"gpt2-{tag}", gpt2, dtype),
                      Workload(f"{small_name}-{tag}", small, dtype)]
    workloads.append(Workload("large-fp32-amsgrad", (large,), torch.float32, amsgrad=True))
    return workloads


def scaling_workloads(total: int, counts: tuple[int, ...] = (10, 100, 1000, 10000)) -> list[Workload]:
    """``count`` equal fp32 tensors holding ``total`` elements together."""
    return [Workload(f"{count}-tensors", tuple((max(1, total // count),) for _ in range(count)))
            for count in counts]
