"""One row of the architecture matrix: a tiny model of a model type saved by its own `save_pretrained`, the ordinary
PEFT rsLoRA adapter on it (`all-linear`, a rank and an alpha pattern, `target_parameters` on fused expert tensors),
and PEFT's `merge_and_unload()` of those very files, the truth the merge is compared with."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft_oracle import perturb_trainable, read_folder
from tiny_models import Row, tiny_model

DTYPE = torch.bfloat16
MAX_PARAMETERS = 30_000_000  # a model type whose smallest config is bigger is skipped (time, not coverage)


@dataclass
class Case:
    row: Row
    base: Path
    adapter: Path
    peft: Path  # PEFT's merged model, saved
    notes: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)

    def truth(self) -> dict[str, torch.Tensor]:
        return read_folder(self.peft)


def _model_class(row: Row):
    import transformers

    return getattr(transformers, row.class_name)


def lora_config(model: torch.nn.Module, *, exclude: list[str] | None = None):
    """The ordinary adapter: every Linear (PEFT's `all-linear`), rsLoRA, one module family at another rank and one at
    another alpha, and the model's fused expert parameters (3-D, under `experts`) as `target_parameters`."""
    from peft import LoraConfig

    leaves = sorted(
        {
            name.rpartition(".")[2]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name
        }
    )
    experts = sorted(
        {".".join(name.split(".")[-2:]) for name, p in model.named_parameters() if p.dim() == 3 and "experts" in name}
    )
    return LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        init_lora_weights=False,
        target_modules="all-linear",
        rank_pattern={leaves[0]: 2} if leaves else {},
        alpha_pattern={leaves[-1]: 16} if leaves else {},
        target_parameters=experts or None,
        exclude_modules=exclude,
    )


def _peft_model(load):
    """get_peft_model with the ordinary config on `load()`; Mamba-based models leave out what PEFT refuses there
    (on a fresh model: a refused get_peft_model leaves the model half wrapped)."""
    from peft import get_peft_model

    model = load()
    try:
        return get_peft_model(model, lora_config(model))
    except ValueError as e:
        if "incompatible with Mamba-based models" not in str(e):
            raise
    model = load()
    return get_peft_model(model, lora_config(model, exclude=["out_proj", "conv1d"]))


def build_case(row: Row, folder: Path, *, max_shard_size: str | None = None) -> Case:
    """The row's base, adapter and PEFT's merge of them (skipped, with the reason, where the model type does not
    build or PEFT cannot make its adapter)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tiny_model(row, DTYPE)
        except Exception as e:  # noqa: BLE001 - the reason is the skip message
            pytest.skip(f"{row.model_type}: the tiny config does not build ({type(e).__name__}: {str(e)[:160]})")
        size = sum(p.numel() for p in model.parameters())
        if size > MAX_PARAMETERS:
            pytest.skip(f"{row.model_type}: its smallest config still has {size / 1e6:.0f}M parameters")
        base, adapter, peft = folder / "base", folder / "adapter", folder / "peft"
        try:
            model.save_pretrained(base, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        except Exception as e:  # noqa: BLE001
            pytest.skip(
                f"{row.model_type}: transformers' own save_pretrained fails on the tiny model "
                f"({type(e).__name__}: {str(e)[:160]})"
            )
        cls = _model_class(row)
        try:
            cls.from_pretrained(base, dtype=DTYPE)
        except Exception as e:  # noqa: BLE001
            pytest.skip(
                f"{row.model_type}: transformers does not load the checkpoint its own save_pretrained wrote "
                f"({type(e).__name__}: {str(e)[:160]})"
            )
        try:
            trained = _peft_model(lambda: cls.from_pretrained(base, dtype=DTYPE))
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"{row.model_type}: PEFT cannot make the adapter ({type(e).__name__}: {str(e)[:160]})")
        perturb_trainable(trained, seed=1)
        trained.save_pretrained(adapter)
        case = Case(
            row,
            base,
            adapter,
            peft,
            target_parameters=json.loads((adapter / "adapter_config.json").read_text())["target_parameters"] or [],
        )
        fresh = cls.from_pretrained(base, dtype=DTYPE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = PeftModel.from_pretrained(fresh, adapter)
        missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
        if missing:  # PEFT does not reload its own adapter: the model it trained is the truth
            case.notes.append(f"PEFT reloads its own adapter with keys missing: {missing[0][:200]}")
            reloaded = trained
        reloaded.merge_and_unload().save_pretrained(peft)
        return case
