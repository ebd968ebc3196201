"""Rotary position embeddings: the angle tables (with Llama 3.1's frequency scaling, or HF's
"linear" scaling: Gemma 3's global layers) and the rotation, in Meta's interleaved layout.
The decoder's forward takes the tables of positions 0 .. T-1 (training: every sequence
starts at 0) or, over a key/value cache, the angles at each sequence's own positions
(:func:`rope_at`)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (HF ``rope_type: "llama3"``): long wavelengths are
    stretched by ``factor``, short ones kept, the band between blended smoothly."""

    factor: float = 8.0  # divides the low frequencies
    low_freq_factor: float = 1.0  # wavelengths beyond original / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # the pretraining context

    def inv_freq(self, inv_freq_f: jax.Array) -> jax.Array:
        """Scaled inverse frequencies, same shape; HF's ``_compute_llama3_parameters``."""
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq_f
        scaled = jnp.where(wavelen > low_wavelen, inv_freq_f / self.factor, inv_freq_f)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """HF's ``rope_type: "linear"``: every frequency divided by ``factor`` (positions
    stretched by it); Gemma 3's global layers (factor 8 from 4B up)."""

    factor: float = 1.0  # divides every inverse frequency

    def inv_freq(self, inv_freq_f: jax.Array) -> jax.Array:
        """Scaled inverse frequencies, same shape (HF's
        ``_compute_linear_scaling_rope_parameters``)."""
        return inv_freq_f / self.factor


RopeScaling = Llama3RopeScaling | LinearRopeScaling


def rope_scaling_of(record: dict | None) -> RopeScaling | None:
    """The scaling a ``dataclasses.asdict`` record holds (a checkpoint's JSON): its fields
    name its kind (a linear scaling has only ``factor``)."""
    if not record:
        return None
    fields = {f.name for f in dataclasses.fields(LinearRopeScaling)}
    kind = LinearRopeScaling if set(record) <= fields else Llama3RopeScaling
    return kind(**record)


def rope_at(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles at ``positions`` (any shape ...), each (..., E/2),
    in float32: only the positions asked for (decoding needs a few, not a whole table)."""
    inv_freq_f = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is not None:
        inv_freq_f = scaling.inv_freq(inv_freq_f)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq_f  # (..., E/2)
    return jnp.cos(angles), jnp.sin(angles)


def rope_tables(
    head_dim: int, seq_len: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles of positions 0 .. T-1, each (T, E/2), in float32."""
    return rope_at(jnp.arange(seq_len), head_dim, theta, scaling)


def apply_rope(x_bthe: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive feature pairs (x[2i], x[2i+1]) by position-dependent angles.

    ``cos``/``sin``: (T', E/2) tables whose first T rows are positions 0..T-1 (training: every
    sequence starts at 0), or (B, T, E/2), each sequence's own positions (decoding).

    Meta's (and torchtitan's) interleaved layout. Hugging Face's ``rotate_half`` pairs x[i]
    with x[i + E/2] instead; :mod:`jtp.models.hf` permutes the q/k projection rows within
    each head when it loads or saves, so the same weights give the same logits.
    """
    b, t, h, e = x_bthe.shape
    pairs = x_bthe.astype(jnp.float32).reshape(b, t, h, e // 2, 2)  # (B, T, H, E/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (B, T, H, E/2) each
    if cos.ndim == 2:  # (T', E/2) -> (1, T, 1, E/2)
        cos, sin = cos[None, :t, None, :], sin[None, :t, None, :]
    else:  # (B, T, E/2) -> (B, T, 1, E/2)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(b, t, h, e).astype(x_bthe.dtype)  # (B, T, H, E)
