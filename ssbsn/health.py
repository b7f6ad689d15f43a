"""Did the training work? A check that needs no clean image.

A blind-spot network is trained to predict each noisy pixel from the pixels around it, never
from the pixel itself. The simplest such prediction needs no training at all: the mean of the
8 pixels at the training PD stride f around it (offsets f·(±1, 0), f·(0, ±1), f·(±1, ±1)),
the nearest pixels the network sees once PD has split the image. A trained network that
predicts the noisy pixels clearly worse than that mean, measured with the training loss (L1),
has not learned: its training went wrong or was far too short. "Clearly": the loss against the
noisy pixels is mostly the noise itself, so it tells models apart by little. Healthy 8-minute
quick models of the quality benchmark reached 0.90–1.02 of the mean's loss (the 1.02 in the
blue channel of an SS-BSN model that denoised better than the AP-BSN beside it), the one failed
model it recorded 1.39–1.55; the check fails a model above :data:`LIMIT` (1.1) in any channel.

The check measures both on large crops of the training images (up to 256 px: the scale the
model denoises at, not the training crop's). A model can look fine on training-sized crops
and fail on whole images: with PD's tiled map (``pd_layout="mosaic"``) and small crops the
network can reach pixels next to the blind spot in the image (:mod:`ssbsn.pd`), and one quick
model of the quality benchmark learned to rely on them, which no larger image offers
(benchmarks/results/quality_lag_debias/seed1/).

The check runs once at the end of :func:`ssbsn.train.train`; its result is part of the run's
summary and of check.json in the run folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

LIMIT = 1.1  # a network above 1.1 times the mean's loss in any channel has failed
CHECK_SIZE = 256  # the largest crop side the check uses
CHECK_PIXELS = 8 * 256 * 256  # about how many pixels it looks at
CHECK_IMAGES = 32  # at most this many images, spread over the source


def neighbour_mean(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The mean of the 8 pixels at offsets stride·(−1..1, −1..1) except the centre, for the
    interior of ``x`` (B, C, H, W): a (B, C, H − 2·stride, W − 2·stride) tensor."""
    s = stride
    H, W = x.shape[-2:]
    if H <= 2 * s or W <= 2 * s:
        raise ValueError(f"a {H}×{W} crop has no interior at stride {s}")
    parts = [x[..., s + dy:H - s + dy, s + dx:W - s + dx]
             for dy in (-s, 0, s) for dx in (-s, 0, s) if (dy, dx) != (0, 0)]
    return torch.stack(parts).mean(0)


@dataclass
class TrainingCheck:
    """Per channel, the mean |prediction − noisy| over the interior of the check's crops: of
    the trained network (its training forward) and of the 8-neighbour mean."""
    network: list
    neighbours: list
    stride: int
    crops: int
    size: int

    @property
    def ratio(self) -> list:
        return [n / b if b > 0 else (0.0 if n == 0 else float("inf"))
                for n, b in zip(self.network, self.neighbours)]

    @property
    def ok(self) -> bool:
        """The network is within :data:`LIMIT` of the 8-neighbour mean's loss, or below it, in
        every channel."""
        return all(r <= LIMIT for r in self.ratio)

    def describe(self) -> str:
        """One line for the user."""
        ratios = " / ".join(f"{r:.2f}" for r in self.ratio)
        head = (f"the network's blind-spot loss is {ratios} of that of the plain mean of the 8 "
                f"pixels at PD stride {self.stride} around each pixel (per channel, "
                f"{self.crops} crops of {self.size} px of the training images)")
        if self.ok:
            return f"check: {head}; a failed training is above {LIMIT:g}"
        return (f"warning: training failed: {head}, above {LIMIT:g}, so the network has not "
                "learned to denoise; train again with another --seed, a lower --lr, or longer")

    def to_dict(self) -> dict:
        """Plain JSON values (an infinite ratio, where the mean is exact and the network is
        not, is written as null)."""
        ratio = [r if r != float("inf") else None for r in self.ratio]
        return dict(asdict(self), ratio=ratio, ok=self.ok, message=self.describe())


def check_size(source, stride: int, crop: int) -> int:
    """The check's crop side: the smallest image side of ``source``, at most
    :data:`CHECK_SIZE`, rounded down to a multiple of ``stride``, and at least ``crop``."""
    side = min(min(source.shape(i)[:2]) for i in range(len(source)))
    return max(min(side, CHECK_SIZE) // stride * stride, crop)


@torch.no_grad()
def check_training(model, source, stride: int, crop: int, channels: int = 3, seed: int = 0,
                   batch: int = 4, device=None) -> TrainingCheck:
    """Compare ``model``'s blind-spot loss with the 8-neighbour mean's on crops of the images
    of ``source`` (a training image source, :mod:`ssbsn.data`) of side :func:`check_size`,
    one or more crops of each image (:data:`CHECK_IMAGES` images at most, spread over the
    source), about :data:`CHECK_PIXELS` pixels in all where the images allow."""
    from .data import PatchDataset
    size = check_size(source, stride, crop)
    dataset = PatchDataset(source, size, channels, augment=False, repeat=1, seed=seed)
    n = len(source)
    images = sorted({round(i * (n - 1) / max(CHECK_IMAGES - 1, 1)) for i in range(CHECK_IMAGES)}
                    if n > CHECK_IMAGES else range(n))  # spread over the source
    places = min((h - size + 1) * (w - size + 1)
                 for h, w in (source.shape(i)[:2] for i in images))
    per_image = max(1, min(places, -(-CHECK_PIXELS // (size * size * len(images))), 8))
    # crop j of image i is the dataset's item i + n·j (its own random place)
    index = [i + n * j for i in images for j in range(per_image)]
    crops = len(index)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    s = int(stride)
    net = bse = None
    try:
        for start in range(0, crops, batch):
            x = torch.stack([dataset[(0, i)] for i in index[start:start + batch]])
            x = x.to(device)
            y = model(x).float()  # the training forward: PD at the training stride
            inner = x[..., s:-s, s:-s]
            a = (y[..., s:-s, s:-s] - inner).abs().sum((0, 2, 3)).double()
            b = (neighbour_mean(x, s) - inner).abs().sum((0, 2, 3)).double()
            net, bse = (a, b) if net is None else (net + a, bse + b)
    finally:
        model.train(was_training)
    count = crops * (size - 2 * s) ** 2
    return TrainingCheck(network=(net / count).tolist(), neighbours=(bse / count).tolist(),
                         stride=s, crops=crops, size=size)


# The check's result travels in the final weights' safetensors metadata under this key (JSON of
# TrainingCheck.to_dict()), so a copied model file still says whether its training worked.
CHECK_KEY = "ssbsn_check"


def stored_check(weights) -> dict | None:
    """The training check recorded for the weights file ``weights``: the safetensors metadata
    (:data:`CHECK_KEY`; a safetensors file is known by its content, as loading knows it, so a
    copy renamed ``.bin`` or ``.SAFETENSORS`` still says it), else the run folder's check.json
    beside a ``model.safetensors``; ``weights`` may be the run folder itself. None when neither
    holds a readable one (older files, the authors' checkpoints)."""
    import json

    from .checkpoint import RUN_WEIGHTS, file_format, weights_file
    from .errors import CheckpointError
    text = None
    try:
        path = weights_file(weights)
        safetensors = path.is_file() and file_format(path) == "safetensors"
    except CheckpointError:  # not a checkpoint at all: loading it says why
        safetensors = False
    if safetensors:
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                text = (f.metadata() or {}).get(CHECK_KEY)
        except Exception:  # an unreadable file: loading it says why
            return None
        if text is None and path.name == RUN_WEIGHTS:
            try:
                text = (path.parent / "check.json").read_text()
            except (OSError, UnicodeDecodeError):
                text = None
    if text is None:
        return None
    try:
        check = json.loads(text)
    except ValueError:
        return None
    if not isinstance(check, dict) or not isinstance(check.get("ok"), bool):
        return None
    return check


def failed_check_line(weights, check: dict) -> str:
    """What to say about weights whose training check failed."""
    ratio = check.get("ratio")
    ratios = (" / ".join("inf" if r is None else f"{r:.2f}" for r in ratio)
              if isinstance(ratio, list) and all(r is None or isinstance(r, (int, float))
                                                 for r in ratio) else "?")
    return (f"{weights}: this model failed its training check (blind-spot loss {ratios} of the "
            f"8-neighbour mean's, above {LIMIT:g}): it has not learned to denoise and its "
            "outputs are not denoised images; train it again")
