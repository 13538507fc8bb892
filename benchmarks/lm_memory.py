"""Peak memory of one language-model distillation loss step (forward + backward through the LM heads), dense
against chunked, measured side by side in one run.

    python benchmarks/lm_memory.py                               # CPU: V=32000, T=2048, B=1, H=512
    python benchmarks/lm_memory.py --device cuda --vocab 128256 --seq-len 8192 --hidden 2048

Cases (both from the same final hidden states, head weights and labels; forward KL + cross-entropy, shift=True):
    dense: the full logits of both models (``F.linear``), then ``forward_kl_loss`` and ``F.cross_entropy``, backward.
    chunked: :func:`lightning_kd.losses.chunked.chunked_distillation_loss`, once per ``--chunk-size``.

Measurement: each case first runs once at a tiny size (libraries load, lazy state initialises), then builds its
inputs and measures the full-size step. On CUDA: ``torch.cuda.max_memory_allocated`` above the memory held once the
inputs exist. On CPU each case runs in a fresh subprocess (with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc
hands freed large blocks back at once and the resident set follows the live tensors), which records its resident set
size before the step and reads the peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) after it; the
growth is the step's peak. The student's gradients (hidden states and head weight) count in both cases. One JSON
line per case, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lightning_kd.losses.chunked import chunked_distillation_loss
from lightning_kd.losses.token import forward_kl_loss


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, t, h, v = args.batch_size, args.seq_len, args.hidden, args.vocab
    inputs = dict(
        student_hidden=torch.randn(b, t, h, generator=g).to(device),
        student_head_weight=(torch.randn(v, h, generator=g) * h**-0.5).to(device),
        teacher_hidden=torch.randn(b, t, args.teacher_hidden, generator=g).to(device),
        teacher_head_weight=(torch.randn(v, args.teacher_hidden, generator=g) * args.teacher_hidden**-0.5).to(device),
    )
    inputs["student_hidden"].requires_grad_(True)
    inputs["student_head_weight"].requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    return inputs, labels


def step(case, inputs, labels, chunk_size):
    if case == "dense":
        student_logits = F.linear(inputs["student_hidden"], inputs["student_head_weight"])
        with torch.no_grad():
            teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_head_weight"])
        kd = forward_kl_loss(student_logits, teacher_logits, labels, shift=True)
        ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    else:
        kd, ce = chunked_distillation_loss(**inputs, labels=labels, shift=True, chunk_size=chunk_size)
    (kd + ce).backward()
    return float(kd.detach()), float(ce.detach())


def run_case(case, args) -> dict:
    device = torch.device(args.device)
    # a small step first, so that loading libraries and lazy initialisation do not count as the step's memory
    tiny = argparse.Namespace(**{**vars(args), "vocab": 64, "seq_len": 16, "hidden": 8, "teacher_hidden": 8})
    step(case, *make_inputs(tiny, device), args.chunk_size)
    inputs, labels = make_inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base, base_peak = current_rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    kd, ce = step(case, inputs, labels, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
        if peak_rss_bytes() <= base_peak:  # the high-water mark of building the inputs hid the step's peak
            raise RuntimeError("the step's peak stayed below the peak of building the inputs: cannot measure it")
    seconds = time.perf_counter() - start
    full_logits_mib = args.batch_size * args.seq_len * args.vocab * 4 / 2**20
    return dict(case=case, device=args.device, vocab=args.vocab, seq_len=args.seq_len, batch_size=args.batch_size,
                hidden=args.hidden, chunk_size=args.chunk_size if case == "chunked" else None,
                peak_mib=round(peak / 2**20, 1), one_fp32_logits_mib=round(full_logits_mib, 1),
                seconds=round(seconds, 2), kd=round(kd, 6), ce=round(ce, 6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[64, 256, 1024], help="tokens per chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--case", choices=["dense", "chunked"], help="run one case in this process (internal)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.case:
        args.chunk_size = args.chunk_size[0]
        print(json.dumps(run_case(args.case, args)))
        return
    # glibc returns freed blocks of 64 KiB and more to the system at once, so the resident set follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    common = ["--device", args.device, "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    results = []
    for case, chunk_size in [("dense", None)] + [("chunked", size) for size in args.chunk_size]:
        if args.device == "cpu":  # a fresh process per case: ru_maxrss is a per-process high-water mark
            command = [sys.executable, __file__, *common, "--case", case, "--chunk-size", str(chunk_size or 1)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            result = json.loads(out.strip().splitlines()[-1])
        else:
            result = run_case(case, argparse.Namespace(**{**vars(args), "chunk_size": chunk_size}))
            torch.cuda.empty_cache()
        results.append(result)
        print(json.dumps(result))
    dense = results[0]
    for chunked in results[1:]:
        same = all(abs(dense[k] - chunked[k]) <= 1e-4 * max(abs(dense[k]), 1.0) for k in ("kd", "ce"))
        print(json.dumps(dict(chunk_size=chunked["chunk_size"],
                              chunked_over_dense_peak=round(chunked["peak_mib"] / dense["peak_mib"], 4),
                              chunked_over_dense_seconds=round(chunked["seconds"] / dense["seconds"], 3),
                              same_loss=same)))


if __name__ == "__main__":
    main()
