"""Train and calibrate the cascade gate (``lesionseg train-gate``).

    lesionseg train-gate -o runs/gate --minutes 4 [--extra-cases lung2] [--attach sts-clcs [--name NAME[@VERSION]] [--card-out DIR]]

Training data: the z-slabs of STS_001-033 (and ``--extra-cases``, e.g. the chest scan lung2) on
the model grid, cropped to the body exactly as at inference.  A slab is positive when it holds
lesion voxels; the lesion-free slabs are the real negatives.  Batches are balanced 50/50 and the
loss is a focal loss (alpha 0.75, gamma 2).  The threshold is then calibrated on the slabs of
the validation cases STS_034-041: among thresholds with slab recall >= ``--min-recall`` (0.95),
the one with the best F2.  The gate never sees the validation labels during training.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .. import data as dataset
from ..learn.labels import RetrainError
from .model import DEFAULT_GATE_NETWORK, GATE_JSON, SlabGate, slab_labels, slabs_of, write_gate_json


def load_gate_case(case: dataset.Case, spacing, windows) -> tuple[torch.Tensor, np.ndarray]:
    """Model-grid channels of the body crop (as the pipeline makes them) and the label there."""
    from ..io.images import read_image, read_label
    from ..io.preprocess import body_box, normalize, resample, spacing_zyx, target_shape, to_canonical
    from ..io.resample import resample as resample_antialiased

    img = read_image(case.image)
    can = to_canonical(img)
    hu = sitk.GetArrayFromImage(can).astype(np.float32)
    lab = sitk.GetArrayFromImage(to_canonical(read_label(case.label, img)))
    bad = lab[(lab != 0) & (lab != 1)]
    if bad.size:
        from ..errors import InputError

        found = ", ".join(f"{v:g}" for v in np.unique(bad)[:5])
        raise InputError(f"label values must be 0 (background) or 1 (lesion); found {found}", str(case.label))
    lab = lab.astype(np.float32)
    box = body_box(hu, spacing_zyx(can))
    shape = target_shape(hu[box.slices].shape, spacing_zyx(can), spacing)
    x = normalize(torch.from_numpy(resample_antialiased(hu[box.slices], shape)), windows)
    y = (resample(lab[box.slices], shape) > 0.5).numpy().astype(np.uint8)
    return x.half(), y


def calibrate_threshold(scores, labels, min_recall: float = 0.95, beta: float = 2.0) -> dict:
    """Threshold with recall >= ``min_recall`` that maximises F-beta (ties: the higher threshold)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if labels.sum() == 0:
        raise ValueError("calibration needs at least one positive region")
    best = None
    for t in np.unique(scores):
        pred = scores >= t
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        fn = int((~pred & labels).sum())
        recall = tp / (tp + fn)
        if recall < min_recall:
            continue
        precision = tp / max(tp + fp, 1)
        fb = (1 + beta**2) * precision * recall / max(beta**2 * precision + recall, 1e-12)
        cand = {"threshold": float(t), "recall": recall, "precision": precision, f"f{beta:g}": fb,
                "skipped_fraction": float(1 - pred.mean())}
        if best is None or fb >= best[f"f{beta:g}"]:
            best = cand
    return best


def sample_batch(cases, slab, batch, rng, min_voxels):
    """A balanced batch of randomly offset, randomly flipped slabs and their labels."""
    xs, ys = [], []
    for i in range(batch):
        want = i % 2
        for _ in range(50):
            x, y = cases[int(rng.integers(len(cases)))]
            z0 = int(rng.integers(-(slab // 2), max(1, x.shape[1] - slab // 2)))
            lo, hi = max(0, z0), min(x.shape[1], z0 + slab)
            lab = int(y[lo:hi].sum() >= min_voxels)
            if lab == want:
                break
        s = torch.zeros((x.shape[0], slab, *x.shape[2:]))
        s[:, lo - z0 : hi - z0] = x[:, lo:hi].float()
        flips = [ax for ax in (2, 3) if rng.random() < 0.5]
        xs.append(s.flip(flips) if flips else s)
        ys.append(lab)
    # slabs of one batch have different in-plane sizes: pad to the largest
    h = max(s.shape[2] for s in xs)
    w = max(s.shape[3] for s in xs)
    xs = [torch.nn.functional.pad(s, (0, w - s.shape[3], 0, h - s.shape[2])) for s in xs]
    return torch.stack(xs), torch.tensor(ys, dtype=torch.float32)


@torch.inference_mode()
def case_scores(net, x, slab) -> np.ndarray:
    s = slabs_of(x.float(), slab)
    return torch.sigmoid(torch.cat([net(s[i : i + 8]) for i in range(0, s.shape[0], 8)])).numpy()


def main(argv=None) -> int:
    from ..cli.train_gate import add_arguments

    ap = argparse.ArgumentParser(prog="lesionseg train-gate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def case_list_problem(train_names, val_names) -> str | None:
    """One line about repeated case names, or cases both in training and calibration."""
    for what, names in (("--train/--extra-cases", train_names), ("--val", val_names)):
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            return f"cases {dup} are given more than once in {what}"
    both = sorted(set(train_names) & set(val_names))
    if both:
        return f"cases {both} are both training and calibration cases"
    return None


def slab_problem(train_labels, train_names, val, slab, min_voxels) -> str | None:
    """One line when the training slabs hold no lesion, or the calibration cases no lesion slab."""
    if int(np.asarray(train_labels).sum()) == 0:
        return (f"the training cases {list(train_names)} have no slab with >= {min_voxels} lesion voxels; "
                "the gate cannot learn what a lesion slab is")
    if not any(slab_labels(y, slab, min_voxels).sum() for _, y in val.values()):
        return (f"the calibration cases {list(val)} have no slab with >= {min_voxels} lesion voxels; "
                "the threshold cannot be calibrated for recall")
    return None


def run(args) -> int:
    from monai.losses import FocalLoss
    from monai.utils import set_determinism

    from ..models import get_card, save_weights

    set_determinism(args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1)
    seg = get_card(args.model).part("segmenter")
    spacing, windows = seg["spacing_zyx"], seg["hu_windows"]
    train_names = (args.train or dataset.STS_TRAIN) + list(args.extra_cases)
    val_names = args.val or dataset.STS_VAL
    problem = case_list_problem(train_names, val_names)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.attach:  # the gated model's id and folder, now rather than after the training budget
        try:
            gated_identity(args.attach, args.output, args.card_out, args.name)
        except RetrainError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    t0 = time.time()
    train = [load_gate_case(dataset.case(n), spacing, windows) for n in train_names]
    val = {n: load_gate_case(dataset.case(n), spacing, windows) for n in val_names}
    labels = np.concatenate([slab_labels(y, args.slab, args.min_voxels) for _, y in train])
    problem = slab_problem(labels, train_names, val, args.slab, args.min_voxels)
    if problem:  # now, not after the training budget
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"loaded {len(train)} training cases ({int(labels.sum())} lesion / {int((labels == 0).sum())} lesion-free slabs) "
          f"and {len(val)} calibration cases in {time.time() - t0:.1f}s", flush=True)

    net = SlabGate(**{k: v for k, v in DEFAULT_GATE_NETWORK.items() if k != "type"})
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = FocalLoss(use_softmax=False, gamma=2.0, alpha=0.75)
    rng = np.random.default_rng(args.seed)
    start, step, losses = time.time(), 0, []
    net.train()
    while time.time() - start < args.minutes * 60 and not (args.max_steps and step >= args.max_steps):
        x, y = sample_batch(train, args.slab, 16, rng, args.min_voxels)
        loss = loss_fn(net(x)[:, None], y[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"step {step} t={(time.time() - start) / 60:.1f}min loss={np.mean(losses[-25:]):.4f}", flush=True)
    minutes = (time.time() - start) / 60
    net.eval()
    scores, labs, per_case = [], [], {}
    for n, (x, y) in val.items():
        s, lab = case_scores(net, x, args.slab), slab_labels(y, args.slab, args.min_voxels)
        scores.append(s)
        labs.append(lab)
        per_case[n] = {"slabs": len(s), "lesion_slabs": int(lab.sum())}
    cal = calibrate_threshold(np.concatenate(scores), np.concatenate(labs), args.min_recall)
    for info, s in zip(per_case.values(), scores):
        info["open"] = int((s >= cal["threshold"]).sum())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_weights(net, out / "gate.safetensors")
    part = {
        "file": "gate.safetensors",
        "sha256": sha,
        "network": DEFAULT_GATE_NETWORK,
        "slab": args.slab,
        "margin": args.margin,
        "threshold": cal["threshold"],
        "spacing_zyx": spacing,
        "hu_windows": windows,
        "calibration": {"cases": list(val), "min_recall": args.min_recall, **{k: round(v, 4) for k, v in cal.items()}, "per_case": per_case},
        "training": {"command": "lesionseg train-gate " + " ".join(sys.argv[2:] if argv_is_cli() else sys.argv[1:]),
                     "cases": train_names, "slab_labels": {"lesion": int(labels.sum()), "lesion_free": int((labels == 0).sum())},
                     "steps": step, "minutes": round(minutes, 2), "loss": "focal (alpha 0.75, gamma 2), balanced batches of 16",
                     "threads": torch.get_num_threads()},
    }
    write_gate_json(out, part)
    print(f"gate: {step} steps in {minutes:.1f} min; threshold {cal['threshold']:.4f} -> calibration recall "
          f"{cal['recall']:.3f}, precision {cal['precision']:.3f}, F2 {cal['f2']:.3f}, skipped {cal['skipped_fraction']:.3f}")
    if args.attach:
        try:
            card = attach_gate(args.attach, out, args.card_out, args.name)
        except RetrainError as exc:  # the gate itself is written: say where, and what to do
            print(f"error: the gate is in {out}, but no gated model was written: {exc}", file=sys.stderr)
            return 2
        print(f"model card {card.id} written to {card.folder}")
    return 0


def argv_is_cli() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "train-gate"


def gated_identity(model: str, gate_dir, card_out, name: str | None = None) -> tuple[str, str, Path]:
    """(name, version, folder) of the card ``train-gate --attach`` writes; raises ``RetrainError``
    naming what is wrong (checked before the training, so a clash costs nothing).

    ``name`` is ``NAME`` or ``NAME@VERSION`` (default ``<model's name>-gated``).  Without
    ``card_out`` the card goes where ``retrain`` puts a version: ``<user models>/NAME/VERSION``, the
    next free version unless one is given, so it is listed and offered like any other.  A
    ``card_out`` inside the user model folder must be such a ``NAME/VERSION`` folder, and it gives
    the name and version when ``name`` does not (they must agree when it does): a card there is
    listed by what its card says, so a folder ``ftg/1`` holding ``ftg@1.2.0`` (the base's version,
    kept before), a card in ``<user models>/NAME`` (whose later versions ``NAME/2`` were then never
    listed) or one inside another model's folder (never listed at all) misled.  A ``card_out``
    elsewhere is not listed; its version is the next free one among the listed models."""
    from .. import models
    from ..errors import ModelError
    from ..learn.model_writer import resolve_output
    from ..learn.versions import next_version

    base = models.get_card(model)
    new_name, at, version = (name or f"{base.name}-gated").partition("@")
    try:
        models.check_model_id(new_name, version if at else None)
    except ModelError as exc:
        raise RetrainError(f"--name: {exc}") from None
    root = models.user_models_dir().expanduser().resolve()
    out = None if card_out is None else Path(card_out).expanduser().resolve()
    gate = None if gate_dir is None else Path(gate_dir).expanduser().resolve()
    if gate is not None and out is not None and (gate == out or out in gate.parents):
        raise RetrainError(f"the gate folder {gate_dir} (-o) lies in the gated model's folder {out}; "
                           "the model needs a folder of its own")
    if out is None or out == root or root in out.parents:  # a version in the user model folder, as retrain writes one
        if out is None:
            problem = models.user_models_problem()
            if problem:
                raise RetrainError(f"the gated model cannot go to the user model folder: {problem}; give --card-out DIR")
        else:
            rel = out.relative_to(root).parts
            if len(rel) != 2 or (root / rel[0] / models.CARD_NAME).exists():
                raise RetrainError(f"--card-out {card_out} lies in the user model folder {root}, where a model lives in "
                                   "NAME/VERSION (its card would not be listed as it says); leave --card-out out to put it "
                                   "there, or give such a folder")
            if (name and rel[0] != new_name) or (version and rel[1] != version):
                raise RetrainError(f"--card-out {card_out} is the folder of {rel[0]}@{rel[1]}, not of "
                                   f"{new_name}@{version or '...'} (--name); give them alike, or one of the two")
            new_name, version = rel
        new_name, version, out = resolve_output(base, f"{new_name}@{version}" if version else new_name)
    else:  # an explicit folder elsewhere: not listed, so the next free version among the listed ones
        version = version or next_version(new_name)
        if any(c.name == new_name and c.version == version for c in models.list_models()):
            raise RetrainError(f"model {new_name}@{version} already exists; give --name another name or NAME@VERSION")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RetrainError(f"the gated model's folder {out} exists and is not empty; give a new folder")
    return new_name, version, out


def attach_gate(model: str, gate_dir: str | os.PathLike, card_out: str | os.PathLike | None = None, name: str | None = None):
    """A model card = ``model``'s card + the gate in ``gate_dir``, written as ``name``
    (:func:`gated_identity`) into the new folder ``card_out``, built under a temporary name and
    renamed into place (:func:`..learn.model_writer.write_version`).

    Every weight file the base's card names (checksum-verified) and the gate's are copied, so the
    new model folder is self-contained like any other version.  The base's figures (``metrics``,
    ``validation``) and its release record are not this model's, so they are not copied: its
    ``metrics`` are the gate's calibration, and the base's figures stay in the parent's card.
    """
    import json

    from ..common import utc_now
    from ..learn.model_writer import copy_routing, parent_link, write_version
    from ..models import get_card, sha256_file

    base = get_card(model)
    gate_dir = Path(gate_dir)
    new_name, version, card_out = gated_identity(model, gate_dir, card_out, name)
    part = json.loads((gate_dir / GATE_JSON).read_text(encoding="utf-8"))
    cal = part["calibration"]

    def build(tmp: Path) -> dict:
        data = {k: v for k, v in json.loads(json.dumps(base.data)).items()
                if k not in ("metrics", "validation", "release_notes", "build_command", "created")}
        for key, section in data.items():  # every network and statistics file the base's card names (not only two)
            if isinstance(section, dict) and "file" in section and key != "gate":
                (tmp / section["file"]).write_bytes(base.verified_bytes(key))
        routing = copy_routing(base, tmp)  # a fine-tuned base's kept parent
        if routing is not None:
            data["routing"] = routing
        shutil.copyfile(gate_dir / part["file"], tmp / part["file"])
        if sha256_file(tmp / part["file"]) != part["sha256"]:
            raise RetrainError(f"{gate_dir / part['file']} does not match the sha256 in {gate_dir / GATE_JSON}")
        data["gate"] = part
        data.update(name=new_name, version=version, created=utc_now(), base_model=base.id, parent=parent_link(base))
        data["description"] = (f"{base.data.get('description', base.name)}; cascade slab gate (threshold "
                               f"{part['threshold']:.3f}, calibrated for >= {cal['min_recall']:.0%} slab recall on "
                               f"{', '.join(cal['cases'])})")
        data["metrics"] = {f"gate_{k}": cal[k] for k in ("recall", "precision", "skipped_fraction") if k in cal}
        data["validation"] = {"what": f"none of its own: {base.id}'s figures are in its card; the gate's calibration "
                                      "is in 'gate.calibration'"}
        data["files"] = {sec["file"]: sec["sha256"] for sec in data.values()
                         if isinstance(sec, dict) and "file" in sec and "sha256" in sec}
        return data

    return write_version(card_out, build)


if __name__ == "__main__":
    sys.exit(main())
