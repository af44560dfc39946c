"""`OmniForCausalLM`: a causal LM plus any number of modality encoders, in the HyperCLOVA X layout.

Modules (state-dict prefixes)::

    model.language_model.*           the causal LM (so its layers are model.language_model.model.layers.N)
    model.vision_model.*             encoder of image/video           model.mm_projector.*     its projector
    model.audio_model.*              encoder of audio                 model.audio_projector.*  its projector
    model.NAME_model.*               encoder of any other modality    model.NAME_projector.*   its projector
    model.NAME_compressor.*          optional token compressor

Data path of `forward`: ``input_ids`` (with placeholder tokens) -> token embeddings; for each
modality given in ``modality_inputs``: encoder -> projector -> compressor -> masked scatter into the
placeholder positions (`splice_modality_embeddings`) -> the LLM. Labels at placeholder positions
never count in the loss. `generate` works with the KV cache: modality inputs are used at prefill only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hcx_extend.compressors import build_compressor, compressed_length
from hcx_extend.config import IGNORE_INDEX, ModalityConfig, OmniConfig
from hcx_extend.devices import move_to_device
from hcx_extend.encoders import get_encoder
from hcx_extend.layout import iter_safetensors, read_config_dict, write_checkpoint
from hcx_extend.projectors import build_projector
from hcx_extend.splice import splice_modality_embeddings
from hcx_extend.units import parse_dtype
from hcx_extend.weights import LoadReport, load_tensors, tensors_to_save

# A training run's checkpoint (trained parts + adapters, no base weights) carries this file.
RUN_FILE = "run.json"
OMNI_MODEL_TYPES = ("hcx_omni", "vlm")


class OmniModel(nn.Module):
    """Holds the LLM and each modality's encoder, projector and compressor under their HCX names."""

    def __init__(self, config: OmniConfig):
        super().__init__()
        self.config = config
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # Share one config object so vocab resizes and attention settings stay in sync.
        config.text_config = self.language_model.config
        for modality in config.modalities.values():
            self.build_modality(modality)

    def build_modality(self, modality: ModalityConfig) -> None:
        """Create the modality's modules that do not exist yet (shared modules are built once).

        The encoder kind checks its settings and fills the modality's input contract first, so a bad
        config fails here with a message naming the modality, before anything is allocated.
        """
        modality.input = get_encoder(modality.encoder["model_type"]).resolve_contract(modality)
        for name in (modality.encoder_module, modality.projector_module, modality.compressor_module):
            if name is not None and not hasattr(self, name):
                self.add_module(name, self._build(modality, name))

    def fresh_component(self, name: str) -> nn.Module:
        """A freshly initialised module for component ``name`` (``language_model`` or a modality module)."""
        if name == "language_model":
            return AutoModelForCausalLM.from_config(self.config.text_config)
        for modality in self.config.modalities.values():
            if name in (modality.encoder_module, modality.projector_module, modality.compressor_module):
                return self._build(modality, name)
        raise ValueError(f"no modality owns component {name!r}; components: {self.component_names()}")

    def _build(self, modality: ModalityConfig, name: str) -> nn.Module:
        encoder = get_encoder(modality.encoder["model_type"])
        hidden = self.config.text_config.hidden_size
        if name == modality.encoder_module:
            return encoder.build(modality.encoder)
        if name == modality.projector_module:
            return build_projector(modality.projector, encoder.output_size(modality.encoder), hidden)
        return build_compressor(modality.compressor, hidden)

    def component_names(self) -> list[str]:
        """Top-level module names under ``model.``: ``language_model`` first, then modality modules."""
        return [name for name, _ in self.named_children()]


class OmniForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM extended with the modalities of its `OmniConfig`.

    ``carried_tensors`` holds checkpoint tensors under prefixes this model does not build (for example
    ``model.discrete_vision_model.*`` of the Omni checkpoint); `save_pretrained` writes them back
    unchanged so a load-extend-save cycle never drops a tensor.

    ``fresh_components`` names the components whose weights were initialised here rather than loaded
    (all of them for a model built from a config; the new modality's modules after `extend`).
    Training strategies use it: LoRA adapts pretrained weights, so a fresh encoder is trained in full.
    """

    config_class = OmniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def __init__(self, config: OmniConfig):
        super().__init__(config)
        self.model = OmniModel(config)
        self.carried_tensors: dict[str, torch.Tensor] = {}
        self.fresh_components: set[str] = set(self.model.component_names())
        self.check_placeholder_ids()
        self.post_init()

    # ----------------------------------------------------------------- structure
    @property
    def language_model(self) -> PreTrainedModel:
        return self.model.language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def input_device(self) -> torch.device:
        """Where ``input_ids`` and modality batches go: the device the token embeddings run on.

        For a model dispatched with a device map (accelerate hooks), the embeddings' execution device;
        their weight may sit on the CPU, the disk or the meta device between calls.
        """
        embeddings = self.get_input_embeddings()
        hook = getattr(embeddings, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        return embeddings.weight.device

    def modality_modules(self, name: str) -> dict[str, nn.Module]:
        """The modules of modality ``name``: ``{"encoder": ..., "projector": ..., ["compressor": ...]}``."""
        modality = self.config.modality(name)
        modules = {
            "encoder": getattr(self.model, modality.encoder_module),
            "projector": getattr(self.model, modality.projector_module),
        }
        if modality.compressor_module is not None:
            modules["compressor"] = getattr(self.model, modality.compressor_module)
        return modules

    def add_modality(self, modality: ModalityConfig | dict[str, Any]) -> ModalityConfig:
        """Add a modality to the config and build its freshly initialised modules."""
        modality = self.config.add_modality(modality)
        before = set(self.model.component_names())
        try:
            self.model.build_modality(modality)
            self.fresh_components |= set(self.model.component_names()) - before
            self.check_placeholder_ids()
        except Exception:
            del self.config.modalities[modality.name]
            raise
        return modality

    def check_placeholder_ids(self) -> None:
        vocab = self.get_input_embeddings().num_embeddings
        for modality in self.config.modalities.values():
            if modality.token_id is None:
                continue
            if not 0 <= modality.token_id < vocab:
                raise ValueError(
                    f"{modality.name}: placeholder id {modality.token_id} is outside the LLM vocabulary (size {vocab}); "
                    "let OmniProcessor.align_tokens add the token and resize the embeddings, or set a token_id below "
                    f"{vocab}"
                )

    def cast_weights(self, dtype: torch.dtype | str) -> None:
        """Hold every floating parameter in ``dtype``; buffers keep theirs (transformers keeps rotary tables
        in float32, and ``model.to(dtype)`` would round them, changing the logits)."""
        dtype = parse_dtype(dtype)
        for parameter in self.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)

    def set_train_mode(self) -> None:
        """Training mode (dropout on) only for components that learn; frozen ones stay deterministic.

        Exception: transformers checkpoints a decoder layer only while that layer is in training mode, so
        with gradient checkpointing on, a frozen LLM's layers get ``training=True`` themselves (not their
        attention or MLP children, so no dropout turns on).
        """
        self.train()
        for _, module in self.model.named_children():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        for layer in self.language_model.get_decoder().layers:
            if getattr(layer, "gradient_checkpointing", False):
                layer.training = True

    def resize_vocab(self, size: int) -> None:
        """Grow the LLM's embeddings (and untied head) to ``size`` rows; existing rows stay bit-identical.

        New rows are the mean of the existing rows: deterministic (a checkpoint that does not store the
        embeddings rebuilds the same rows on every load) and, for a head, a logit no larger than average.
        """
        old = self.get_input_embeddings().num_embeddings
        if size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {size}")
        self.language_model.resize_token_embeddings(size, mean_resizing=False)
        with torch.no_grad():
            for module in {id(m): m for m in (self.get_input_embeddings(), self.get_output_embeddings())
                           if m is not None}.values():
                weight = module.weight
                if weight.shape[0] == size and weight.device.type != "meta":
                    weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
        self.config.text_config.vocab_size = size

    def _init_weights(self, module: nn.Module) -> None:
        # Transformers sub-models initialise themselves; our own modules use PyTorch's default init.
        if hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
            module.reset_parameters()

    # ----------------------------------------------------------------- encoding
    def encode_modality(self, name: str, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Encode, project and compress one modality's batch: one ``(tokens_i, llm_hidden)`` tensor per item.

        Token counts come from the batch's own metadata (lengths, grids) and the compressor kind's
        `compressed_length`, never from reading device tensors back, so this also runs on the meta
        device (the memory estimator traces it there).
        """
        modality = self.config.modality(name)
        encoder = get_encoder(modality.encoder["model_type"])
        encoder.validate_batch(batch, modality)
        modules = self.modality_modules(name)
        features = encoder.encode(modules["encoder"], batch, modality)
        projector = modules["projector"]
        projector_parameter = next(projector.parameters())
        lengths = [f.shape[0] for f in features]
        projected = projector(torch.cat(features).to(projector_parameter.device, projector_parameter.dtype))
        items = list(torch.split(projected, lengths))
        if "compressor" in modules:
            padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
            compressed, _ = modules["compressor"](padded, torch.tensor(lengths))
            kept = [compressed_length(modality.compressor, n) for n in lengths]
            items = [compressed[i, :n] for i, n in enumerate(kept)]
        return items

    def embed_inputs(
        self, input_ids: torch.LongTensor, modality_inputs: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with every modality's embeddings spliced into its placeholders."""
        modality_inputs = modality_inputs or {}
        for name in modality_inputs:
            self.config.modality(name)  # raises for unknown names
        embeddings = self.get_input_embeddings()
        vocab = embeddings.num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab}): min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )
        inputs_embeds = embeddings(input_ids)
        for modality in self.config.modalities.values():
            batch = modality_inputs.get(modality.name)
            if batch is None:
                if modality.token_id is not None and bool((input_ids == modality.token_id).any()):
                    count = int((input_ids == modality.token_id).sum())
                    raise ValueError(
                        f"{modality.name}: input_ids hold {count} placeholder token(s) (id {modality.token_id}) "
                        f"but no {modality.name} inputs were given"
                    )
                continue
            if modality.token_id is None:
                raise ValueError(f"{modality.name}: has no placeholder token id; run OmniProcessor.align_tokens first")
            features = self.encode_modality(modality.name, batch)
            inputs_embeds = splice_modality_embeddings(inputs_embeds, input_ids, modality.token_id, features, modality.name)
        return inputs_embeds

    def placeholder_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """True where ``input_ids`` hold any modality's placeholder token."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for modality in self.config.modalities.values():
            if modality.token_id is not None:
                mask |= input_ids == modality.token_id
        return mask

    # ----------------------------------------------------------------- forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        modality_inputs: dict[str, dict[str, torch.Tensor]] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the LLM on text plus modality inputs.

        Args:
            input_ids: ``(batch, seq)`` with one placeholder token per modality embedding.
            attention_mask: ``(batch, seq)``, 1 for real tokens.
            labels: ``(batch, seq)``; ``-100`` is ignored; placeholder positions are ignored regardless.
            logits_to_keep: as in transformers (0 = all positions). With ``"labels"`` it may be the string
                ``"labels"`` to compute logits only where a label is predicted (training: much cheaper
                when the vocabulary is large); the returned logits are then ``(kept, vocab)``.
            modality_inputs: ``{name: batch dict}`` as produced by `OmniProcessor`.
            label_smoothing: of the loss's cross-entropy (training only; 0 = the plain likelihood).

        Returns:
            `CausalLMOutputWithPast` with ``loss`` (mean token cross-entropy) when labels are given.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # The one place batches meet the model's device: callers hand over CPU batches from the processor.
        device = self.input_device
        input_ids, attention_mask, position_ids, labels, modality_inputs = move_to_device(
            (input_ids, attention_mask, position_ids, labels, modality_inputs), device)
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, modality_inputs)
        elif modality_inputs:
            raise ValueError("modality_inputs need input_ids (to find placeholders), not inputs_embeds")

        target_mask = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(self.placeholder_mask(input_ids), IGNORE_INDEX)
            # Position t predicts token t + 1.
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]
            if isinstance(logits_to_keep, str):
                if logits_to_keep != "labels":
                    raise ValueError(f"logits_to_keep must be an int, a tensor or 'labels', got {logits_to_keep!r}")
                target_mask = targets != IGNORE_INDEX
                logits_to_keep = target_mask
        elif isinstance(logits_to_keep, str):
            raise ValueError("logits_to_keep='labels' needs labels")

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = None
        if labels is not None:
            if target_mask is not None:
                kept_targets = targets[target_mask]
                flat_logits = outputs.logits
            else:
                kept = outputs.logits.shape[1]
                kept_targets = targets[:, -kept:].reshape(-1)
                flat_logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
            if (kept_targets != IGNORE_INDEX).any():
                loss = F.cross_entropy(flat_logits.float(), kept_targets, ignore_index=IGNORE_INDEX,
                                       label_smoothing=label_smoothing)
            else:
                loss = flat_logits.sum() * 0.0
        return CausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, *args: Any, **kwargs: Any):
        """transformers' ``generate`` with ``modality_inputs``; tensors are moved to `input_device` first, so
        the returned ids live there too."""
        device = self.input_device
        return super().generate(move_to_device(input_ids, device), *args, **move_to_device(kwargs, device))

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        modality_inputs = kwargs.pop("modality_inputs", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # Modality embeddings go in at prefill only; later steps read them from the KV cache.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["modality_inputs"] = modality_inputs
        return model_inputs

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB", **kwargs) -> None:
        """Write config.json and safetensors shards in the HyperCLOVA X layout (`hcx_extend.layout`), atomically."""
        if kwargs:
            raise TypeError(f"save_pretrained got unsupported arguments {sorted(kwargs)}")
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        write_checkpoint(tensors_to_save(self), config, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | str | None = None, strict: bool = True, **kwargs):
        """Load a complete HCX-layout omni checkpoint folder (ours, a merged run, or the Omni hub's).

        A training run's ``checkpoint/`` holds only what was trained; a plain causal LM holds no
        modalities. Both are refused with the loader to use (`hcx_extend.load_model` reads every kind).
        """
        if kwargs:
            raise TypeError(f"from_pretrained got unsupported arguments {sorted(kwargs)}")
        model, _ = cls.from_folder(path, dtype=dtype, strict=strict)
        return model

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    strict: bool = True) -> tuple[OmniForCausalLM, LoadReport]:
        """`from_pretrained` that also returns the `LoadReport`."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a checkpoint folder")
        if (directory / RUN_FILE).exists():
            raise ValueError(
                f"{directory} is a training run's checkpoint: it holds only the trained parts and refers to its base "
                "model; load it with hcx_extend.load_model(path) (or `hcx-extend merge` it into a full checkpoint)"
            )
        raw = read_config_dict(directory)
        if raw.get("model_type") not in OMNI_MODEL_TYPES:
            raise ValueError(
                f"{directory}/config.json has model_type {raw.get('model_type')!r}, not an omni checkpoint "
                f"({' or '.join(OMNI_MODEL_TYPES)}); load it with hcx_extend.load_model(path) or add modalities "
                "with hcx_extend.extend(path, ...)"
            )
        try:
            with init_empty_weights(include_buffers=False):
                model = cls(OmniConfig(**raw))
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{directory}/config.json: {error}") from None
        report = load_tensors(model, iter_safetensors(directory), strict=strict, source=str(directory))
        if dtype is not None:
            model.cast_weights(dtype)
        model.tie_weights()
        model.eval()
        return model, report
