"""Throughput of a distillation step, every case measured side by side in one process: the compute limit, a plain
PyTorch KD loop as the popular CIFAR KD code writes it, a raw loop doing lightning-kd's math on the same tensors, and
lightning-kd's ``fit`` (real Trainer, data module and method), with and without the teacher-output cache.

One JSON line per case: images per second after warm-up, peak memory, and the ratios.

    python benchmarks/throughput.py --pair cifar --device cpu --batch-size 64 --precision 32  # CPU: resnet20 → resnet8
    python benchmarks/throughput.py --pair cifar --device cuda --batch-size 256 --precision bf16-mixed \\
        --channels-last --compile                                      # GPU: resnet32x4 → resnet8x4
    python benchmarks/throughput.py --pair imagenet --device cuda --batch-size 256 --precision bf16-mixed \\
        --channels-last --compile                                      # GPU: ResNet34 → ResNet18 at 224 px

Cases:
    student_step / teacher_forward: the student's training step alone and the teacher's forward alone on one batch
        already on the device, with the same precision, memory format, compilation and optimizer as ``fit``;
        ``limit`` = 1 / (1/student + 1/teacher), what a distillation step can reach.
    plain: float32 loop over a DataLoader with per-sample CPU transforms (PIL crop/flip/normalise in worker
        processes), KL with ``batchmean`` × T² plus CE — the loop of the popular CIFAR KD repositories.
    raw: the same math as ``fit`` on the same device-resident batches, without Lightning.
    fit: ``Trainer.fit`` of ``KD`` on the device-resident data module, no logger, checkpoint or progress bar.
    fit_cached: ``fit`` with :class:`~lightning_kd.cache.TeacherOutputCache` (built before timing; its build time
        is reported), to compare with ``student_step``.
    data (not in the default list): the training batches alone, per-sample pipeline against device-resident.

Data: CIFAR-100-shaped random images written in the official python-pickle format and read by the real data module
(the benchmark puts their MD5s in torchvision's table), or, for the ImageNet pair, random 224 px images held by a
device-resident data module (flip and normalise). Throughput does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_kd.cache import TeacherOutputCache
from lightning_kd.data import CIFAR100DataModule
from lightning_kd.data.base import ImageClassificationDataModule
from lightning_kd.data.device import Augmentation
from lightning_kd.losses import kd_loss
from lightning_kd.methods import KD
from lightning_kd.methods.base import sgd
from lightning_kd.models import create_model

PAIRS = {  # (teacher, student) per device
    ("cifar", "cpu"): ("resnet20", "resnet8"),
    ("cifar", "cuda"): ("resnet32x4", "resnet8x4"),
    ("imagenet", "cuda"): ("torchvision:resnet34", "torchvision:resnet18"),
    ("imagenet", "cpu"): ("torchvision:resnet34", "torchvision:resnet18"),
}


# ------------------------------------------------------------------------------------------------------- data
def write_random_cifar100(root: Path, num_train: int, num_test: int) -> None:
    """Random images in CIFAR-100's python-pickle layout; their MD5s go into torchvision's table so that the data
    module's real loading path (with its integrity check) reads them."""
    cls = CIFAR100DataModule.dataset_class
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, size in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 100, size).tolist()
        entry = {"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8), "fine_labels": labels,
                 "coarse_labels": [label // 5 for label in labels], "filenames": [""] * size, "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=4))
    names = [f"class_{i}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]}))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    cls.train_list, cls.test_list = [["train", md5["train"]]], [["test", md5["test"]]]
    cls.meta = {**cls.meta, "md5": md5["meta"]}


class RandomImages:
    """A split as torchvision keeps CIFAR: ``data`` (N×H×W×3 uint8) and ``targets``."""

    def __init__(self, n: int, size: int, num_classes: int):
        rng = np.random.default_rng(n)
        self.data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.targets = rng.integers(0, num_classes, n).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.fromarray(self.data[index]), self.targets[index]


class RandomImageNetDataModule(ImageClassificationDataModule):
    """Random 224 px images with 1000 classes, flipped and normalised (on the device when device_resident)."""

    num_classes, in_chans = 1000, 3
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    num_train = 2048

    def prepare_data(self) -> None:
        pass

    def load_split(self, train: bool) -> RandomImages:
        return RandomImages(self.num_train if train else 256, 224, 1000)

    def augmentation(self) -> Augmentation:
        return Augmentation(flip=True)

    def train_transform(self):
        from torchvision import transforms

        return transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   transforms.Normalize(self.mean, self.std)])

    eval_transform = train_transform


def make_data(args, device_resident: bool, workers: int = 0) -> ImageClassificationDataModule:
    if args.pair == "cifar":
        return CIFAR100DataModule(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=workers,
                                  device_resident=device_resident)
    return RandomImageNetDataModule(batch_size=args.batch_size, num_workers=workers, device_resident=device_resident)


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # process peak RSS (Linux: KiB)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_loop(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` steps; ``batches`` is re-iterated as needed."""
    done, start = 0, None
    while True:
        for batch in batches:
            if done == warmup:
                synchronize(device)
                start = time.perf_counter()
            step(batch)
            done += 1
            if done == warmup + steps:
                synchronize(device)
                return (time.perf_counter() - start) / steps


class StepTimer(L.Callback):
    """Wall time of ``steps`` training steps after ``warmup`` steps of a ``Trainer.fit``."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.seconds = warmup, steps, math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup + self.steps:
            synchronize(pl_module.device)
            self.seconds = (time.perf_counter() - self.start) / self.steps


# ------------------------------------------------------------------------------------------------------ cases
def build(args, name: str, device: torch.device, memory_format) -> torch.nn.Module:
    torch.manual_seed(0)
    num_classes = 100 if args.pair == "cifar" else 1000
    return create_model(name, num_classes=num_classes).to(device, memory_format=memory_format)


def autocast(args, device: torch.device):
    if args.precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def case_limit(args, device) -> dict[str, float]:
    """Student training step alone and teacher forward alone, same settings as fit."""
    teacher_name, student_name = PAIRS[(args.pair, device.type)]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    size = 32 if args.pair == "cifar" else 224
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100 if args.pair == "cifar" else 1000, (args.batch_size,), device=device)
    out = {}
    reset_memory(device)
    student = build(args, student_name, device, memory_format).train()
    optimizer = sgd(student.parameters())
    student_fn = torch.compile(student) if args.compile else student

    def student_step(_):
        with autocast(args, device):
            loss = F.cross_entropy(student_fn(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out["student_step"] = timed_loop(student_step, [None], args.warmup, args.steps, device)
    out["student_step_mem"] = peak_memory_mb(device)
    reset_memory(device)
    teacher = build(args, teacher_name, device, memory_format).eval().requires_grad_(False)
    teacher_fn = torch.compile(teacher) if args.compile else teacher

    @torch.no_grad()
    def teacher_forward(_):
        with autocast(args, device):
            teacher_fn(x)

    out["teacher_forward"] = timed_loop(teacher_forward, [None], args.warmup, args.steps, device)
    out["teacher_forward_mem"] = peak_memory_mb(device)
    return out


def case_plain(args, device) -> tuple[float, float]:
    """float32, per-sample CPU transforms in DataLoader workers, as the popular CIFAR KD code."""
    teacher_name, student_name = PAIRS[(args.pair, device.type)]
    reset_memory(device)
    data = make_data(args, device_resident=False, workers=args.workers)
    data.setup("fit")
    loader = DataLoader(data.datasets["train"], batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    teacher = build(args, teacher_name, device, torch.contiguous_format).eval()
    student = build(args, student_name, device, torch.contiguous_format).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    T = 4.0

    def step(batch):
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean") * T * T
        loss = 0.1 * F.cross_entropy(logits, targets) + 0.9 * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = timed_loop(step, loader, args.warmup, args.steps, device)
    return seconds, peak_memory_mb(device)


def case_data(args, device) -> dict[str, float]:
    """Training batches alone: the per-sample pipeline (DataLoader workers, then the copy to the device) against the
    device-resident one (crop, flip and normalise per batch on the device)."""
    plain = make_data(args, device_resident=False, workers=args.workers)
    plain.setup("fit")
    loader = DataLoader(plain.datasets["train"], batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    resident = make_data(args, device_resident=True)
    resident.setup("fit")
    batches = resident._device_batches("train").to(device)
    to_device = lambda batch: [t.to(device, non_blocking=True) for t in batch]
    return {"data_per_sample": timed_loop(to_device, loader, args.warmup, args.steps, device),
            "data_device_resident": timed_loop(lambda batch: None, batches, args.warmup, args.steps, device)}


def kd_module(args, device) -> KD:
    teacher_name, student_name = PAIRS[(args.pair, device.type)]
    torch.manual_seed(0)
    num_classes = 100 if args.pair == "cifar" else 1000
    return KD(student=student_name, teacher=teacher_name, num_classes=num_classes, channels_last=args.channels_last,
              compile=args.compile)


def case_raw(args, device) -> tuple[float, float]:
    """fit's math (KD module's own models, losses, optimizer and fast paths) on the same device-resident batches,
    in a bare loop."""
    reset_memory(device)
    data = make_data(args, device_resident=True)
    data.setup("fit")
    model = kd_module(args, device).to(device)
    model._setup_fast_paths()
    batches = data._device_batches("train").to(device)
    optimizer = sgd(model.trainable_parameters())
    student = model._compiled.get("student", model.student)
    teacher = model._compiled.get("teacher", model.teacher)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.train()

    def step(batch):
        images, targets, _ = batch
        images = images.contiguous(memory_format=memory_format)
        with autocast(args, device):
            with torch.no_grad():
                teacher_logits = teacher(images)
            logits = student(images)
        loss = 0.1 * F.cross_entropy(logits.float(), targets) + 0.9 * kd_loss(logits, teacher_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed_loop(step, batches, args.warmup, args.steps, device)
    return seconds, peak_memory_mb(device)


def case_fit(args, device, cache_dir: Path | None = None) -> tuple[float, float, float | None]:
    reset_memory(device)
    model = kd_module(args, device)
    data = make_data(args, device_resident=True)
    timer = StepTimer(args.warmup, args.steps)
    callbacks: list[L.Callback] = [timer]
    cache = None
    if cache_dir is not None:
        cache = TeacherOutputCache(cache_dir, top_k=args.top_k, batch_size=1024)
        callbacks.append(cache)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=args.precision,
                        max_steps=args.warmup + args.steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    return timer.seconds, peak_memory_mb(device), None if cache is None else round(cache.build_seconds, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--cases", default="limit,plain,raw,fit,fit_cached")
    parser.add_argument("--num-train", type=int, default=50_000, help="CIFAR training images written")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cases = args.cases.split(",")
    teacher_name, student_name = PAIRS[(args.pair, device.type)]
    header = {"pair": f"{teacher_name}->{student_name}", "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)", "batch_size": args.batch_size,
              "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
              "torch": torch.__version__, "lightning": L.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if args.pair == "cifar" and args.data_dir is None:
            args.data_dir = tmp
            write_random_cifar100(Path(tmp), args.num_train, 1000)
        results, img_s = [], {}

        def report(case: str, seconds: float, memory: float, **extra) -> None:
            img_s[case] = args.batch_size / seconds
            line = {**header, "case": case, "img_s": round(img_s[case]), "peak_mem_mb": memory, **extra}
            results.append(line)
            print(json.dumps(line), flush=True)

        if "data" in cases:
            data = case_data(args, device)
            report("data_per_sample", data["data_per_sample"], None)
            report("data_device_resident", data["data_device_resident"], None,
                   **{"device_resident/per_sample": round(data["data_per_sample"] / data["data_device_resident"], 2)})
        if "limit" in cases:
            limit = case_limit(args, device)
            report("student_step", limit["student_step"], limit["student_step_mem"])
            report("teacher_forward", limit["teacher_forward"], limit["teacher_forward_mem"])
            report("limit", limit["student_step"] + limit["teacher_forward"], None)
        if "plain" in cases:
            report("plain", *case_plain(args, device))
        if "raw" in cases:
            report("raw", *case_raw(args, device))
        if "fit" in cases:
            seconds, memory, _ = case_fit(args, device)
            ratios = {f"fit/{base}": round(args.batch_size / seconds / img_s[base], 3)
                      for base in ("limit", "plain", "raw") if base in img_s}
            report("fit", seconds, memory, **ratios)
        if "fit_cached" in cases:
            seconds, memory, build = case_fit(args, device, cache_dir=Path(tmp) / "teacher_cache")
            ratios = {f"fit_cached/{base}": round(args.batch_size / seconds / img_s[base], 3)
                      for base in ("student_step", "fit") if base in img_s}
            report("fit_cached", seconds, memory, cache_build_s=build, **ratios)


if __name__ == "__main__":
    sys.exit(main())
