"""Put modality embeddings where their placeholder tokens are.

The processor decides where placeholders go (one placeholder token per embedding an item yields);
this module only fills them. Embeddings of all items of a modality are concatenated in item order
and written over the placeholder positions in row-major order of ``input_ids`` (a masked scatter),
so items of several samples, several items per sample and padded rows all work in one batch.
"""

from __future__ import annotations

import torch


def splice_modality_embeddings(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    token_id: int,
    features: list[torch.Tensor],
    modality: str,
) -> torch.Tensor:
    """Return ``inputs_embeds`` with the ``token_id`` positions replaced by ``features``.

    Args:
        inputs_embeds: ``(batch, seq, hidden)`` token embeddings.
        input_ids: ``(batch, seq)``.
        token_id: the modality's placeholder id.
        features: one ``(tokens_i, hidden)`` tensor per item, in the order items appear in ``input_ids``
            (row by row, left to right).
        modality: name used in error messages.

    Raises:
        ValueError: if the number of placeholder positions differs from the total number of embeddings.
    """
    mask = input_ids == token_id
    placeholders = int(mask.sum())
    counts = [f.shape[0] for f in features]
    if placeholders != sum(counts):
        shown = " + ".join(map(str, counts[:8])) + (" + ..." if len(counts) > 8 else "")
        raise ValueError(
            f"{modality}: input_ids hold {placeholders} placeholder token(s) (id {token_id}) but the "
            f"{len(features)} item(s) give {sum(counts)} embedding(s) ({shown or 'none'}); build input_ids with "
            "OmniProcessor so each item gets one placeholder per embedding"
        )
    if not features:
        return inputs_embeds
    values = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), values)
