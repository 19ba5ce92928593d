"""MONAI bundle export: a trained fastnmf model as a bundle MONAI's tools can run.

``fastnmf export --checkpoint RUN --bundle DIR`` (:func:`export_bundle`) writes::

    DIR/configs/metadata.json    versions, task, the network's inputs and outputs, regions
    DIR/configs/inference.json   the inference workflow (MONAI ConfigParser syntax)
    DIR/configs/logging.conf     logging for MONAI's bundle runner
    DIR/models/model.pt          the model's state dict (plain tensors)
    DIR/models/model.pt2         the eval network as an exported program (torch.export)
    DIR/docs/README.md           what the model does and how to run it
    DIR/LICENSE

The workflow is MONAI's own: a ``Dataset`` over the NIfTI files of ``dataset_dir`` (one case per
file; channels in the 4th dimension), fastnmf's validation transforms (the same loading checks and
normalisation as training), a ``DataLoader``, a ``SlidingWindowInferer`` (the training crop,
50 % overlap, gaussian blending), ``Activationsd`` (sigmoid), then :class:`SaveLabelMapd`, which
writes each case through
:func:`fastnmf.infer.write_prediction`, the writer of ``fastnmf infer``: same threshold, label
values, voxel grid, affine and header. The loop is :func:`run_inference` (MONAI's
``SupervisedEvaluator`` and ``CheckpointLoader`` need pytorch-ignite, which fastnmf does not
depend on). The network is built by :func:`network` from the training config stored in
``inference.json``, so the bundle needs fastnmf installed (listed in
``required_packages_version``)::

    python -m monai.bundle run --config_file DIR/configs/inference.json \\
        --dataset_dir /path/to/nifti --output_dir /path/to/out

``models/model.pt2`` (:mod:`fastnmf.program`) is the same network as a ``torch.export`` program
for users who want the bare network without building it: windows in, logits out (no sliding
window, sigmoid or threshold); ``--no-program`` skips it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from . import data as fdata

__all__ = [
    "export_bundle",
    "network",
    "preprocessing",
    "datalist",
    "run_inference",
    "SaveLabelMapd",
]

SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)


def _info(info: fdata.DatasetInfo | dict[str, Any]) -> fdata.DatasetInfo:
    from .infer import info_from_dict

    return info if isinstance(info, fdata.DatasetInfo) else info_from_dict(info)


def network(*, config: dict[str, Any], info: dict[str, Any], kernel: str = "auto") -> nn.Module:
    """The untrained network of a training ``config`` for data ``info`` (both as in a fastnmf
    checkpoint); the bundle's ``CheckpointLoader`` then loads ``models/model.pt`` into it."""
    from .config import TrainConfig
    from .infer import build_model

    cfg = TrainConfig.from_dict({**config, "kernel": kernel})
    return build_model(cfg, _info(info)).eval()


def preprocessing(*, info: dict[str, Any]):
    """fastnmf's inference transforms (:func:`fastnmf.data.val_transforms`, labels optional)."""
    return fdata.val_transforms(_info(info), resample=True, require_label=False)


def datalist(dataset_dir: str | Path) -> list[dict[str, Any]]:
    """One case per NIfTI file of ``dataset_dir`` (sorted), id = the file name without
    ``.nii(.gz)``, as ``fastnmf infer --data FILE``."""
    root = Path(dataset_dir)
    if not str(dataset_dir) or not root.is_dir():
        raise fdata.MissingFileError(
            root, "input folder not found; pass --dataset_dir /path/to/nifti_folder"
        )
    files = sorted(p for p in root.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise fdata.DataError(root, "no .nii or .nii.gz files in the input folder")
    return [
        {"id": p.name[: -len(".nii.gz")] if p.name.endswith(".gz") else p.stem, "image": [str(p)]}
        for p in files
    ]


@torch.no_grad()
def run_inference(
    *,
    network: nn.Module,
    dataloader,
    inferer,
    postprocessing,
    checkpoint: str | Path,
    device: str | torch.device,
) -> int:
    """Load the weights ``checkpoint`` (a state dict, ``weights_only``) into ``network``, then
    for every batch of ``dataloader``: ``pred = inferer(image, network)``, split the batch
    (:func:`monai.data.decollate_batch`) and apply ``postprocessing`` to each case. Returns the
    number of cases."""
    from monai.data import decollate_batch

    state = torch.load(checkpoint, map_location=device, weights_only=True)
    network.load_state_dict(state)
    network.eval()
    n = 0
    for batch in dataloader:
        image = batch["image"]
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        batch["pred"] = inferer(x.to(device), network)  # (B, R, *S) logits
        for item in decollate_batch(batch):
            postprocessing(item)
            n += 1
    return n


class SaveLabelMapd(MapTransform):
    """Post-processing: region probabilities ``pred`` ``(R, *S)`` → ``<output_dir>/<id>.nii.gz``
    with :func:`fastnmf.infer.write_prediction` (threshold, label values, the input's grid,
    affine and header), the input file and id taken from the image's metadata."""

    def __init__(
        self,
        keys: str = "pred",
        *,
        info: dict[str, Any],
        output_dir: str | Path,
        threshold: float = 0.5,
        image_key: str = "image",
    ) -> None:
        super().__init__(keys)
        self.info = _info(info)
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .infer import write_prediction

        d = dict(data)
        meta = d[self.image_key].meta
        reference = meta["filename_or_obj"]
        case_id = meta.get("case_id") or Path(reference).name.split(".nii")[0]
        for key in self.key_iterator(d):
            prob = torch.as_tensor(d[key]).detach().cpu().numpy()
            masks = prob > self.threshold  # (R, *S), as fastnmf.infer.predict_case
            write_prediction(masks, self.info, reference, self.output_dir / f"{case_id}.nii.gz")
        return d


def _versions() -> dict[str, str]:
    import monai

    from . import __version__

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # MONAI (1.6 here) reads an "optional_packages_version" as a deprecated name of this key and
        # replaces this one with it: one list (fire: MONAI's bundle command line; triton comes
        # with fastnmf and is used only on a GPU)
        "required_packages_version": {"fastnmf": __version__, "nibabel": _version("nibabel"),
                                      "fire": _version("fire")},  # fmt: skip
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _metadata(cfg, info: fdata.DatasetInfo, ckpt: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    best = ckpt.get("best") or {}
    patch = [cfg.crop_size] * 3
    regions = {str(k): name for k, name in enumerate(info.regions)}
    channels = {str(k): name for k, name in enumerate(info.channel_names)} or {"0": "image"}
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fastnmf {__version__}"},
        **_versions(),
        "name": f"fastnmf {cfg.model}",
        "task": f"3D segmentation of {', '.join(info.regions)}",
        "description": (
            f"A {cfg.model} (fastnmf, Factorizer family) trained for {ckpt.get('step')} steps on "
            f"{cfg.data} (fold {cfg.fold}); best validation mean Dice "
            f"{best.get('dice', float('nan')):.4f} at step {best.get('step')}."
        ),
        "authors": "fastnmf export",
        "copyright": "Copyright (c) the fastnmf authors",
        "intended_use": "research only; not for clinical use",
        "data_source": str(cfg.data),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR/CT",
                    "num_channels": info.in_channels,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": channels,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "classes",
                    "num_channels": info.out_channels,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": regions,
                }
            },
        },
    }


def _inference_config(cfg, info: fdata.DatasetInfo, root: Path) -> dict[str, Any]:
    from .infer import info_to_dict

    config = cfg.to_dict()
    config["kernel"] = "auto"  # triton on CUDA, torch on CPU (see --kernel of fastnmf infer)
    return {
        "imports": ["$import os", "$import fastnmf.bundle as fastnmf_bundle"],
        "bundle_root": str(root),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "kernel": "auto",
        "datalist": "$fastnmf_bundle.datalist(@dataset_dir)",
        "fastnmf_config": config,
        "data_info": info_to_dict(info),
        "network_def": {
            "_target_": "fastnmf.bundle.network",
            "config": "@fastnmf_config",
            "info": "@data_info",
            "kernel": "@kernel",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "fastnmf.bundle.preprocessing", "info": "@data_info"},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [cfg.crop_size] * 3,
            "sw_batch_size": cfg.sw_batch_size,
            "overlap": cfg.overlap,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "fastnmf.bundle.SaveLabelMapd",
                    "keys": "pred",
                    "info": "@data_info",
                    "output_dir": "@output_dir",
                },
            ],
        },
        "run": [
            "$fastnmf_bundle.run_inference(network=@network, dataloader=@dataloader, "
            "inferer=@inferer, postprocessing=@postprocessing, checkpoint=@ckpt_path, "
            "device=@device)"
        ],
    }


_LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _readme(cfg, info: fdata.DatasetInfo, meta: dict[str, Any]) -> str:
    return f"""# {meta["name"]}

{meta["description"]}

- input: {info.in_channels} channel(s) ({", ".join(info.channel_names) or "image"}), one NIfTI
  file per case (channels in the 4th dimension), normalised as in training (z-score over the
  non-zero voxels{f"; resampled to {info.spacing} mm" if info.spacing else ""});
- output: `<id>.nii.gz` label maps (values {list(info.label_values)}; regions
  {", ".join(info.regions)}) on the input's voxel grid, with its affine and header;
- sliding-window inference with {cfg.crop_size}³ windows, {cfg.overlap:.0%} overlap, gaussian
  blending; sigmoid per region, threshold 0.5 — the output of `fastnmf infer`.

Run (fastnmf and MONAI installed):

```bash
python -m monai.bundle run --config_file configs/inference.json \\
    --dataset_dir /path/to/nifti_folder --output_dir /path/to/output
```

`models/model.pt2` is the same network as an exported program (`torch.export`; PyTorch path of
the NMF layers; windows {"×".join([str(cfg.crop_size)] * 3)} in, logits out, any batch size):
`import fastnmf, torch; net = torch.export.load("models/model.pt2").module()`.

If the bundle was moved, add `--bundle_root /new/path/of/the/bundle`. On a GPU the NMF layers use
fastnmf's Triton kernels (`--kernel auto`); `--kernel torch` forces the PyTorch path.

{meta["intended_use"].capitalize()}.
"""


def export_bundle(
    checkpoint: str | Path, bundle: str | Path, *, overwrite: bool = False, program: bool = True
) -> Path:
    """Write a MONAI bundle for ``checkpoint`` into the folder ``bundle`` (see the module
    docstring). An existing non-empty folder is refused unless ``overwrite``; ``program`` adds
    ``models/model.pt2``. Returns the path."""
    from .config import TrainConfig
    from .infer import info_from_dict, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    info = info_from_dict(ckpt["info"])
    root = Path(bundle).expanduser().resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite or not root.is_dir():
            raise FileExistsError(f"{root}: exists and is not an empty folder (--overwrite)")
        shutil.rmtree(root)
    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    torch.save(state, root / "models" / "model.pt")
    if program:
        _write_program(ckpt, state, root / "models" / "model.pt2")
    meta = _metadata(cfg, info, ckpt)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    inference = _inference_config(cfg, info, root)
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (root / "configs" / "logging.conf").write_text(_LOGGING)
    (root / "docs" / "README.md").write_text(_readme(cfg, info, meta))
    (root / "LICENSE").write_text(_license())
    return root


def _write_program(ckpt: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> None:
    from .program import export_program

    net = network(config=ckpt["config"], info=ckpt["info"], kernel="torch")
    net.load_state_dict(state)
    export_program(net, in_channels=_info(ckpt["info"]).in_channels, path=path)


def _license() -> str:
    return (
        "Licensed under the Apache License, Version 2.0 (the same licence as fastnmf);\n"
        "you may not use these files except in compliance with the License. You may obtain a\n"
        "copy of the License at http://www.apache.org/licenses/LICENSE-2.0\n\n"
        "The model weights were trained by the user who exported this bundle; the licence of\n"
        "the training data may restrict their use.\n"
    )
