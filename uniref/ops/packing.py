"""Fake kernels and autograd for the SELF packing ops (kernels in csrc/packing/)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.uniref


@torch.library.register_fake("uniref::pack_latents")
def _pack_latents_fake(latents: Sequence[Tensor], images_per_sample: Sequence[int], patch_size: int):
    total = sum((x.shape[1] // patch_size) * (x.shape[2] // patch_size) for x in latents)
    first = latents[0]
    tokens = first.new_empty((total, first.shape[0] * patch_size * patch_size))
    return tokens, first.new_empty((total, 3), dtype=torch.int32)


@torch.library.register_fake("uniref::unpack_latents")
def _unpack_latents_fake(tokens: Tensor, image_sizes: Sequence[int], patch_size: int):
    channels = tokens.shape[1] // (patch_size * patch_size)
    return [tokens.new_empty((channels, h, w)) for h, w in zip(image_sizes[0::2], image_sizes[1::2])]


@torch.library.register_fake("uniref::joint_concat")
def _joint_concat_fake(text: Tensor, image: Tensor, cu_seqlens_text: Tensor, cu_seqlens_image: Tensor):
    return text.new_empty((text.shape[0] + image.shape[0], *text.shape[1:]))


@torch.library.register_fake("uniref::joint_split")
def _joint_split_fake(joint: Tensor, cu_seqlens_text: Tensor, cu_seqlens_image: Tensor, text_total: int):
    rest = joint.shape[1:]
    return joint.new_empty((text_total, *rest)), joint.new_empty((joint.shape[0] - text_total, *rest))


def _image_sizes(latents: Sequence[Tensor]) -> list[int]:
    return [s for x in latents for s in (x.shape[1], x.shape[2])]


def _pack_setup(ctx, inputs, output):
    latents, images_per_sample, patch_size = inputs
    ctx.image_sizes = _image_sizes(latents)
    ctx.patch_size = patch_size


def _pack_backward(ctx, grad_tokens, _grad_position_ids):
    grads = _ops.unpack_latents(grad_tokens.contiguous(), ctx.image_sizes, ctx.patch_size)
    return list(grads), None, None


def _unpack_setup(ctx, inputs, output):
    tokens, image_sizes, patch_size = inputs
    ctx.num_images = len(image_sizes) // 2
    ctx.patch_size = patch_size
    ctx.image_sizes = list(image_sizes)


def _unpack_backward(ctx, grad_images):
    sizes = ctx.image_sizes
    grads = []
    ref = next(g for g in grad_images if g is not None)
    channels = ref.shape[0]
    for k, g in enumerate(grad_images):
        # Images whose output was not used receive no gradient; they still hold token rows.
        grads.append(g if g is not None else ref.new_zeros((channels, sizes[2 * k], sizes[2 * k + 1])))
    tokens, _ = _ops.pack_latents(grads, [len(grads)], ctx.patch_size)
    return tokens, None, None


def _concat_setup(ctx, inputs, output):
    text, _image, cu_text, cu_image = inputs
    ctx.save_for_backward(cu_text, cu_image)
    ctx.text_total = text.shape[0]


def _concat_backward(ctx, grad_joint):
    cu_text, cu_image = ctx.saved_tensors
    grad_text, grad_image = _ops.joint_split(grad_joint.contiguous(), cu_text, cu_image, ctx.text_total)
    return grad_text, grad_image, None, None


def _split_setup(ctx, inputs, output):
    _joint, cu_text, cu_image, _text_total = inputs
    ctx.save_for_backward(cu_text, cu_image)
    ctx.shapes = (output[0].shape, output[1].shape)


def _split_backward(ctx, grad_text, grad_image):
    cu_text, cu_image = ctx.saved_tensors
    like = grad_text if grad_text is not None else grad_image
    if grad_text is None:
        grad_text = like.new_zeros(ctx.shapes[0])
    if grad_image is None:
        grad_image = like.new_zeros(ctx.shapes[1])
    return _ops.joint_concat(grad_text.contiguous(), grad_image.contiguous(), cu_text, cu_image), None, None, None


torch.library.register_autograd("uniref::pack_latents", _pack_backward, setup_context=_pack_setup)
torch.library.register_autograd("uniref::unpack_latents", _unpack_backward, setup_context=_unpack_setup)
torch.library.register_autograd("uniref::joint_concat", _concat_backward, setup_context=_concat_setup)
torch.library.register_autograd("uniref::joint_split", _split_backward, setup_context=_split_setup)
