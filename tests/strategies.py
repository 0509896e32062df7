"""Hypothesis strategies for small random programs built from the blocks mmaccel's passes care about.

A `Program` is a plain, printable description (frozen dataclasses), so a failing example reads as a recipe;
`build(program)` turns it into a fresh `nn.Module` with seeded weights and `make_inputs(program)` into inputs.
Blocks track the running shape [batch, seq, dim] so every generated program runs in eager.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
MAX_SEQ = 7
MAX_DIM = 12

# The explicit-attention forms attention_fusion documents as matched, and the near-misses it must leave alone.
SCALE_FORMS = ("mul_scores", "div_scores", "q", "q_div", "qk", "none")
MASK_FORMS = ("none", "additive_causal", "additive_buffer", "additive_input", "bool_causal", "bool_keep_buffer")
SOFTMAX_FORMS = ("plain", "dtype_f32", "float_cast", "dim3")
NEAR_MISSES = ("probs_reused", "finite_fill", "softmax_dim2")


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    return x


# ---------------------------------------------------------------- block descriptions


@dataclass(frozen=True)
class Linear:
    d_in: int
    d_out: int
    bias: bool
    act: str = "none"


@dataclass(frozen=True)
class Parallel:
    """Linears sharing one input (Q/K/V, gate/up), combined by concatenation, a sum or SwiGLU."""
    d_in: int
    widths: tuple[int, ...]
    bias: tuple[bool, ...]
    combine: str  # "cat" | "sum" | "swiglu"


@dataclass(frozen=True)
class Residual:
    d: int
    bias: bool
    act: str
    norm: str  # "none" | "layer" | "rms": pre-norm before the linear
    residual_first: bool  # x + f(x) vs f(x) + x


@dataclass(frozen=True)
class Norm:
    d: int
    kind: str  # "layer" | "layer_noaffine" | "rms_module" | "rms_manual"


@dataclass(frozen=True)
class Act:
    name: str


@dataclass(frozen=True)
class Softmax:
    dim: int  # -1 or 1 (over the sequence)


@dataclass(frozen=True)
class Attention:
    """Explicit softmax(Q K^T * s + mask) V in one of the forms people write (see the *_FORMS tuples)."""
    d: int
    heads: int
    head_dim: int
    qkv: str  # "separate" | "fused_split" | "fused_chunk"
    key: str  # "transpose" | "permute" (Whisper-style K^T straight from the view)
    scale: str
    mask: str
    softmax: str
    out_proj: bool
    near_miss: str | None = None
    mask_first: bool = False  # mask + scores instead of scores + mask


@dataclass(frozen=True)
class SDPA:
    d: int
    heads: int
    head_dim: int
    mask: str  # "none" | "is_causal" | "bool_causal" | "additive_input"


@dataclass(frozen=True)
class Shuffle:
    """View / reshape / permute / transpose round trips; "seq_mix" mixes along the sequence with a linear."""
    d: int
    seq: int
    kind: str  # "flatten" | "transpose_roundtrip" | "noncontig" | "seq_mix" | "split_dims" | "unsqueeze"
    groups: int = 1


@dataclass(frozen=True)
class Cat:
    d: int
    kind: str  # "features" (x ++ linear(x)) | "seq" (x ++ flipped x)
    width: int = 0


@dataclass(frozen=True)
class Slice:
    dim: str  # "features" | "seq"
    start: int
    stop: int
    step: int = 1


@dataclass(frozen=True)
class Cast:
    kind: str  # "f64_roundtrip" | "f32_island" (norm in float32 inside a low-precision program)
    d: int


@dataclass(frozen=True)
class ConstScale:
    """x * g(w) where g(w) depends on weights only: constant folding material."""
    d: int


@dataclass(frozen=True)
class Conv:
    """conv2d over the activation seen as an image [b, d, seq, 1]: "patch" (kernel = stride = k, ViT/Whisper
    patch embedding, seq -> seq // k) or "same" (kernel 3, padding 1)."""
    d: int
    out: int
    kind: str  # "patch" | "same"
    k: int = 1


@dataclass(frozen=True)
class Index:
    """Index ops with fixed indices: "select_seq" (x[:, idx], idx a buffer), "gather_features"
    (torch.gather along features), "bmm_expand" (x @ w.expand(b, d, d), an explicit bmm)."""
    d: int
    kind: str
    seq: int = 1


@dataclass(frozen=True)
class Program:
    dtype: torch.dtype
    batch: int
    seq: int
    dim: int
    input_kind: str  # "float" | "ids" (embedding)
    layout: str  # "contiguous" | "transposed" | "strided"
    blocks: tuple
    mask_input: str  # "none" | "random" | "causal_min" (additive float mask passed as a second input)
    mask_shape: str  # "b1ss" | "11ss" | "ss"
    return_intermediate: bool
    seed: int
    vocab: int = 11


# ---------------------------------------------------------------- modules


def _mask_causal_bool(s: int, device: torch.device) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)


class LinearM(nn.Module):
    def __init__(self, spec: Linear) -> None:
        super().__init__()
        self.spec = spec
        self.lin = nn.Linear(spec.d_in, spec.d_out, bias=spec.bias)

    def forward(self, x, mask):
        return activate(self.lin(x), self.spec.act)


class ParallelM(nn.Module):
    def __init__(self, spec: Parallel) -> None:
        super().__init__()
        self.spec = spec
        self.lins = nn.ModuleList(nn.Linear(spec.d_in, w, bias=b) for w, b in zip(spec.widths, spec.bias))

    def forward(self, x, mask):
        ys = [lin(x) for lin in self.lins]
        if self.spec.combine == "sum":
            out = ys[0]
            for y in ys[1:]:
                out = out + y
            return out
        if self.spec.combine == "swiglu":
            return F.silu(ys[0]) * ys[1]
        return torch.cat(ys, dim=-1)


class RMSManual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d)
    if kind == "layer_noaffine":
        return nn.LayerNorm(d, elementwise_affine=False)
    if kind == "rms_module":
        return nn.RMSNorm(d, eps=1e-6)
    if kind == "rms_manual":
        return RMSManual(d)
    return nn.Identity()


class ResidualM(nn.Module):
    def __init__(self, spec: Residual) -> None:
        super().__init__()
        self.spec = spec
        self.norm = make_norm({"layer": "layer", "rms": "rms_module"}.get(spec.norm, "none"), spec.d)
        self.lin = nn.Linear(spec.d, spec.d, bias=spec.bias)

    def forward(self, x, mask):
        y = activate(self.lin(self.norm(x)), self.spec.act)
        return x + y if self.spec.residual_first else y + x


class NormM(nn.Module):
    def __init__(self, spec: Norm) -> None:
        super().__init__()
        self.norm = make_norm(spec.kind, spec.d)

    def forward(self, x, mask):
        return self.norm(x)


class ActM(nn.Module):
    def __init__(self, spec: Act) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x, mask):
        return activate(x, self.spec.name)


class SoftmaxM(nn.Module):
    def __init__(self, spec: Softmax) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x, mask):
        return x.softmax(self.spec.dim)


class _Heads(nn.Module):
    """Q/K/V projections and the head split shared by the attention blocks."""

    def __init__(self, d: int, heads: int, head_dim: int, qkv: str, out_proj: bool) -> None:
        super().__init__()
        self.h, self.hd, self.qkv_form = heads, head_dim, qkv
        inner = heads * head_dim
        if qkv == "separate":
            self.q, self.k, self.v = nn.Linear(d, inner), nn.Linear(d, inner, bias=False), nn.Linear(d, inner)
        else:
            self.qkv = nn.Linear(d, 3 * inner)
        self.o = nn.Linear(inner, d) if out_proj else nn.Identity()

    def project(self, x):
        if self.qkv_form == "separate":
            return self.q(x), self.k(x), self.v(x)
        y = self.qkv(x)
        if self.qkv_form == "fused_chunk":
            return y.chunk(3, dim=-1)
        return y.split(self.h * self.hd, dim=-1)

    def split(self, t):
        b, s, _ = t.shape
        return t.view(b, s, self.h, self.hd).transpose(1, 2)

    def merge(self, t):
        b, _, s, _ = t.shape
        return self.o(t.transpose(1, 2).reshape(b, s, self.h * self.hd))


class AttentionM(nn.Module):
    def __init__(self, spec: Attention) -> None:
        super().__init__()
        self.spec = spec
        self.heads = _Heads(spec.d, spec.heads, spec.head_dim, spec.qkv, spec.out_proj)
        self.register_buffer("causal_keep", torch.ones(MAX_SEQ * 2, MAX_SEQ * 2, dtype=torch.bool).tril())

    def forward(self, x, mask):
        sp, hd = self.spec, self.spec.head_dim
        b, s, _ = x.shape
        q, k, v = self.heads.project(x)
        q, v = self.heads.split(q), self.heads.split(v)
        if sp.key == "permute":
            kt = k.view(b, s, sp.heads, hd).permute(0, 2, 3, 1)
        else:
            kt = self.heads.split(k).transpose(-2, -1)
        scale = hd ** -0.5
        if sp.scale == "q":
            q = q * scale
        elif sp.scale == "q_div":
            q = q / math.sqrt(hd)
        elif sp.scale == "qk":
            q, kt = q * scale ** 0.5, kt * scale ** 0.5
        scores = q @ kt
        if sp.scale == "mul_scores":
            scores = scores * scale
        elif sp.scale == "div_scores":
            scores = scores / math.sqrt(hd)
        neg = float("-inf")
        if sp.near_miss == "finite_fill":
            neg = torch.finfo(scores.dtype).min
        if sp.mask == "additive_causal":
            m = torch.full((s, s), float("-inf"), dtype=scores.dtype, device=x.device).triu(1)
            scores = m + scores if sp.mask_first else scores + m
        elif sp.mask == "additive_buffer":
            m = torch.zeros(s, s, dtype=scores.dtype).masked_fill(~self.causal_keep[:s, :s],
                                                                   torch.finfo(scores.dtype).min)
            scores = m + scores if sp.mask_first else scores + m
        elif sp.mask == "additive_input":
            scores = mask + scores if sp.mask_first else scores + mask
        elif sp.mask == "bool_causal":
            scores = scores.masked_fill(_mask_causal_bool(s, x.device), neg)
        elif sp.mask == "bool_keep_buffer":
            scores = scores.masked_fill(~self.causal_keep[:s, :s], neg)
        if sp.near_miss == "softmax_dim2":
            probs = scores.softmax(dim=2)
        elif sp.softmax == "dtype_f32":
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        elif sp.softmax == "float_cast":
            probs = scores.float().softmax(-1).type_as(q)
        elif sp.softmax == "dim3":
            probs = torch.softmax(scores, dim=3)
        else:
            probs = scores.softmax(dim=-1)
        out = probs @ v
        if sp.near_miss == "probs_reused":
            out = out + probs.mean(dim=-1, keepdim=True)
        return self.heads.merge(out)


class SDPAM(nn.Module):
    def __init__(self, spec: SDPA) -> None:
        super().__init__()
        self.spec = spec
        self.heads = _Heads(spec.d, spec.heads, spec.head_dim, "separate", True)

    def forward(self, x, mask):
        q, k, v = (self.heads.split(t) for t in self.heads.project(x))
        s = x.shape[1]
        if self.spec.mask == "is_causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.spec.mask == "bool_causal":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~_mask_causal_bool(s, x.device))
        elif self.spec.mask == "additive_input":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.heads.merge(out)


class ShuffleM(nn.Module):
    def __init__(self, spec: Shuffle) -> None:
        super().__init__()
        self.spec = spec
        self.mix = nn.Linear(spec.seq, spec.seq) if spec.kind == "seq_mix" else None

    def forward(self, x, mask):
        b, s, d = x.shape
        kind = self.spec.kind
        if kind == "flatten":
            return x.reshape(b, s * d).view(b, s, d)
        if kind == "transpose_roundtrip":
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if kind == "noncontig":  # a non-contiguous activation feeding the next block
            return x.transpose(1, 2).contiguous().transpose(1, 2) * 1.0
        if kind == "seq_mix":
            return self.mix(x.transpose(1, 2)).transpose(1, 2)
        if kind == "split_dims":
            g = self.spec.groups
            y = x.view(b, s, g, d // g).permute(0, 2, 1, 3)  # [b, g, s, d/g]
            return (y * 2.0).permute(0, 2, 1, 3).reshape(b, s, d)
        return x.unsqueeze(0).squeeze(0)


class CatM(nn.Module):
    def __init__(self, spec: Cat) -> None:
        super().__init__()
        self.spec = spec
        self.lin = nn.Linear(spec.d, spec.width) if spec.kind == "features" else None

    def forward(self, x, mask):
        if self.spec.kind == "features":
            return torch.cat([x, self.lin(x)], dim=-1)
        return torch.cat([x, x.flip(1) * 0.5], dim=1)


class SliceM(nn.Module):
    def __init__(self, spec: Slice) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x, mask):
        sp = self.spec
        if sp.dim == "features":
            return x[..., sp.start:sp.stop:sp.step]
        return x[:, sp.start:sp.stop:sp.step]


class CastM(nn.Module):
    def __init__(self, spec: Cast) -> None:
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(spec.d) if spec.kind == "f32_island" else None

    def forward(self, x, mask):
        if self.spec.kind == "f32_island":
            return F.layer_norm(x.float(), self.norm.normalized_shape, self.norm.weight.float(),
                                self.norm.bias.float()).to(x.dtype)
        return (x.double() * 1.5).to(x.dtype)


class ConvM(nn.Module):
    def __init__(self, spec: Conv) -> None:
        super().__init__()
        self.spec = spec
        k = spec.k if spec.kind == "patch" else 3
        self.conv = nn.Conv2d(spec.d, spec.out, kernel_size=(k, 1), stride=(k if spec.kind == "patch" else 1, 1),
                              padding=(0 if spec.kind == "patch" else 1, 0))

    def forward(self, x, mask):
        image = x.transpose(1, 2).unsqueeze(-1)  # [b, d, seq, 1]
        return self.conv(image).squeeze(-1).transpose(1, 2)


class IndexM(nn.Module):
    def __init__(self, spec: Index) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.d * 31 + spec.seq)
        if spec.kind == "select_seq":
            self.register_buffer("idx", torch.randint(0, spec.seq, (spec.seq,), generator=g))
        elif spec.kind == "gather_features":
            self.register_buffer("idx", torch.randint(0, spec.d, (spec.d,), generator=g))
        else:
            self.w = nn.Parameter(torch.randn(1, spec.d, spec.d, generator=g) / max(spec.d, 1) ** 0.5)

    def forward(self, x, mask):
        if self.spec.kind == "select_seq":
            return x[:, self.idx] + x
        if self.spec.kind == "gather_features":
            return torch.gather(x, -1, self.idx.expand(*x.shape[:-1], -1))
        return torch.bmm(x, self.w.expand(x.shape[0], -1, -1))


class ConstScaleM(nn.Module):
    def __init__(self, spec: ConstScale) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(spec.d))

    def forward(self, x, mask):
        return x * (self.w.abs() + 1.0).sqrt().t()


MODULES = {Linear: LinearM, Parallel: ParallelM, Residual: ResidualM, Norm: NormM, Act: ActM, Softmax: SoftmaxM,
           Attention: AttentionM, SDPA: SDPAM, Shuffle: ShuffleM, Cat: CatM, Slice: SliceM, Cast: CastM,
           ConstScale: ConstScaleM, Conv: ConvM, Index: IndexM}


class ProgramModel(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        self.embed = nn.Embedding(program.vocab, program.dim) if program.input_kind == "ids" else None
        self.blocks = nn.ModuleList(MODULES[type(b)](b) for b in program.blocks)

    def forward(self, x, mask=None):
        if self.embed is not None:
            x = self.embed(x)
        first = None
        for block in self.blocks:
            x = block(x, mask)
            if first is None:
                first = x
        if self.program.return_intermediate:
            return x, first
        return x


def build(program: Program) -> nn.Module:
    """A fresh module (fresh class, seeded weights, eval, no grad) in the program's dtype."""
    torch.manual_seed(program.seed)
    cls = type(f"Program_{program.seed}", (ProgramModel,), {})
    model = cls(program)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-trivial norm affine parameters
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
    return model.to(program.dtype).eval().requires_grad_(False)


def make_inputs(program: Program) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(program.seed + 1)
    b, s, d = program.batch, program.seq, program.dim
    if program.input_kind == "ids":
        x = torch.randint(0, program.vocab, (b, s), generator=g)
        if program.layout != "contiguous":
            x = torch.randint(0, program.vocab, (s, b), generator=g).t()
    elif program.layout == "transposed":
        x = torch.randn(b, d, s, generator=g).to(program.dtype).transpose(1, 2)
    elif program.layout == "strided":
        x = torch.randn(b, s, 2 * d, generator=g).to(program.dtype)[..., ::2]
    else:
        x = torch.randn(b, s, d, generator=g).to(program.dtype)
    if program.mask_input == "none":
        return (x,)
    shape = {"b1ss": (b, 1, s, s), "11ss": (1, 1, s, s), "ss": (s, s)}[program.mask_shape]
    if program.mask_input == "random":
        mask = 0.5 * torch.randn(shape, generator=g)
    else:
        mask = torch.zeros(s, s).masked_fill(_mask_causal_bool(s, x.device), torch.finfo(program.dtype).min)
        mask = mask.expand(shape).clone()
    return x, mask.to(program.dtype)


def program_source(program: Program) -> str:
    """A copy-pastable repro of a drawn program (its repr is the recipe; this adds the calls)."""
    return (f"program = {program!r}\nmodel = build(program)\ninputs = make_inputs(program)\n"
            "compile_and_check(model, *inputs)")


# ---------------------------------------------------------------- strategies

sizes_dim = st.integers(1, MAX_DIM)


@st.composite
def _attention(draw, d: int, mask_ok: bool, near_miss_ok: bool = True) -> Attention:
    masks = [m for m in MASK_FORMS if mask_ok or m != "additive_input"]
    near = draw(st.sampled_from((None,) * 6 + NEAR_MISSES)) if near_miss_ok else None
    return Attention(
        d=d, heads=draw(st.integers(1, 3)), head_dim=draw(st.integers(1, 8)),
        qkv=draw(st.sampled_from(("separate", "separate", "fused_split", "fused_chunk"))),
        key=draw(st.sampled_from(("transpose", "transpose", "permute"))),
        scale=draw(st.sampled_from(SCALE_FORMS)), mask=draw(st.sampled_from(masks)),
        softmax=draw(st.sampled_from(SOFTMAX_FORMS)), out_proj=draw(st.booleans()),
        near_miss=near, mask_first=draw(st.booleans()))


@st.composite
def _block(draw, d: int, seq: int, mask_ok: bool, low_precision: bool, static_seq: bool = True):
    """One block for a running activation [batch, seq, d]; returns (block, new d, new seq)."""
    kinds = ["linear", "linear", "parallel", "residual", "residual", "norm", "act", "softmax", "attention",
             "attention", "attention", "sdpa", "shuffle", "cat", "slice", "cast", "const", "conv", "index"]
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        out = draw(sizes_dim)
        return Linear(d, out, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS))), out, seq
    if kind == "parallel":
        combine = draw(st.sampled_from(("cat", "sum", "swiglu")))
        n = 2 if combine == "swiglu" else draw(st.integers(2, 3))
        if combine == "cat":
            widths = tuple(draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)))
        else:
            widths = (draw(st.integers(1, 8)),) * n
        bias = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        out = sum(widths) if combine == "cat" else widths[0]
        return Parallel(d, widths, bias, combine), out, seq
    if kind == "residual":
        return Residual(d, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS)),
                        draw(st.sampled_from(("none", "none", "layer", "rms"))), draw(st.booleans())), d, seq
    if kind == "norm":
        return Norm(d, draw(st.sampled_from(("layer", "layer_noaffine", "rms_module", "rms_manual")))), d, seq
    if kind == "act":
        return Act(draw(st.sampled_from(ACTIVATIONS[1:]))), d, seq
    if kind == "softmax":
        return Softmax(draw(st.sampled_from((-1, 1)))), d, seq
    if kind == "attention":
        att = draw(_attention(d, mask_ok))
        return att, (d if att.out_proj else att.heads * att.head_dim), seq
    if kind == "sdpa":
        masks = ["none", "is_causal", "bool_causal"] + (["additive_input"] if mask_ok else [])
        return SDPA(d, draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.sampled_from(masks))), d, seq
    if kind == "shuffle":
        kinds_ = ["flatten", "transpose_roundtrip", "noncontig", "unsqueeze"] + (["seq_mix"] if static_seq else [])
        divisors = [g for g in range(2, d + 1) if d % g == 0]
        if divisors:
            kinds_.append("split_dims")
        k = draw(st.sampled_from(kinds_))
        groups = draw(st.sampled_from(divisors)) if k == "split_dims" else 1
        return Shuffle(d, seq, k, groups), d, seq
    if kind == "cat":
        if static_seq and seq * 2 <= MAX_SEQ * 2 and draw(st.booleans()):
            return Cat(d, "seq"), d, seq * 2
        w = draw(st.integers(1, 5))
        return Cat(d, "features", w), d + w, seq
    if kind == "slice":
        if static_seq and seq > 1 and draw(st.booleans()):
            start = draw(st.integers(0, seq - 1))
            return Slice("seq", start, seq), d, seq - start
        if d == 1:
            return Slice("features", 0, 1), 1, seq
        start = draw(st.integers(0, d - 1))
        stop = draw(st.integers(start + 1, d))
        step = draw(st.sampled_from((1, 1, 2)))
        return Slice("features", start, stop, step), len(range(start, stop, step)), seq
    if kind == "cast":
        return Cast(draw(st.sampled_from(("f64_roundtrip", "f32_island") if low_precision else ("f64_roundtrip",))),
                    d), d, seq
    if kind == "conv":
        out = draw(sizes_dim)
        divisors = [k for k in range(2, seq + 1) if seq % k == 0]
        if static_seq and divisors and draw(st.booleans()):
            k = draw(st.sampled_from(divisors))
            return Conv(d, out, "patch", k), out, seq // k
        return Conv(d, out, "same"), out, seq
    if kind == "index":
        kinds_ = ["gather_features", "bmm_expand"] + (["select_seq"] if static_seq else [])
        return Index(d, draw(st.sampled_from(kinds_)), seq), d, seq
    if kind == "const":
        return ConstScale(d), d, seq
    raise AssertionError(kind)


@st.composite
def programs(draw, max_blocks: int = 4, dtypes=(torch.float32,) * 6 + (torch.bfloat16, torch.float16),
             static_seq: bool = True) -> Program:
    dtype = draw(st.sampled_from(dtypes))
    batch, seq, dim = draw(st.integers(1, 3)), draw(st.integers(1, MAX_SEQ)), draw(st.integers(1, MAX_DIM))
    input_kind = draw(st.sampled_from(("float", "float", "float", "ids")))
    layout = draw(st.sampled_from(("contiguous", "contiguous", "transposed", "strided")))
    mask_input = draw(st.sampled_from(("none", "none", "random", "causal_min")))
    mask_shape = draw(st.sampled_from(("b1ss", "11ss", "ss")))
    blocks, d, s = [], dim, seq
    for _ in range(draw(st.integers(1, max_blocks))):
        block, d, s = draw(_block(d, s, mask_ok=mask_input != "none" and s == seq,
                                  low_precision=dtype != torch.float32, static_seq=static_seq))
        blocks.append(block)
    return Program(dtype=dtype, batch=batch, seq=seq, dim=dim, input_kind=input_kind, layout=layout,
                   blocks=tuple(blocks), mask_input=mask_input, mask_shape=mask_shape,
                   return_intermediate=draw(st.booleans()) and len(blocks) > 1, seed=draw(st.integers(0, 2**16)))


@st.composite
def attention_programs(draw, dtypes=(torch.float32,) * 3 + (torch.bfloat16, torch.float16)) -> Program:
    """One explicit attention in a documented form (no near-miss), optionally after a norm: the attention
    pass should rewrite it exactly once."""
    dtype = draw(st.sampled_from(dtypes))
    batch, seq, dim = draw(st.integers(1, 3)), draw(st.integers(1, MAX_SEQ)), draw(st.integers(1, MAX_DIM))
    mask_input = draw(st.sampled_from(("none", "random", "causal_min")))
    att = draw(_attention(dim, mask_ok=mask_input != "none", near_miss_ok=False))
    pre = (Norm(dim, "layer"),) if draw(st.booleans()) else ()
    return Program(dtype=dtype, batch=batch, seq=seq, dim=dim, input_kind="float",
                   layout=draw(st.sampled_from(("contiguous", "transposed"))), blocks=(*pre, att),
                   mask_input=mask_input, mask_shape=draw(st.sampled_from(("b1ss", "11ss", "ss"))),
                   return_intermediate=False, seed=draw(st.integers(0, 2**16)))
