"""Exact matmul/convolution FLOP count of a BiomedGPT forward pass, from the config and the batch shapes.

torch's FlopCounterMode cannot run inside a ZeRO-3 engine (its module tracker trips over partitioned
parameters), so MFU uses this formula instead; a test checks it against FlopCounterMode on a plain model.
Counted: every matmul and convolution (2 FLOPs per multiply-add); not counted: norms, softmax, activations and
embedding lookups (a few percent at most).
"""

from __future__ import annotations

from biomedgpt.model.config import BiomedGPTConfig


def resnet_flops(config: BiomedGPTConfig, height: int, width: int) -> int:
    """Convolutions of ResNet stages 1-3 for one image (stem /4, layer2 and layer3 /2 each)."""

    def conv(c_in: int, c_out: int, kernel: int, h: int, w: int) -> int:
        return 2 * c_in * c_out * kernel * kernel * h * w

    h, w = (height + 1) // 2, (width + 1) // 2
    total = conv(3, 64, 7, h, w)
    h, w = (h + 1) // 2, (w + 1) // 2  # max pool
    inplanes = 64
    for planes, blocks, stride in zip((64, 128, 256), config.resnet_layers, (1, 2, 2)):
        out_h, out_w = (h + stride - 1) // stride, (w + stride - 1) // stride
        for block in range(blocks):
            block_in = inplanes if block == 0 else planes * 4
            if block == 0:
                total += conv(block_in, planes, 1, h, w) + conv(planes, planes, 3, out_h, out_w)
                total += conv(block_in, planes * 4, 1, out_h, out_w)  # downsample
            else:
                total += conv(block_in, planes, 1, out_h, out_w) + conv(planes, planes, 3, out_h, out_w)
            total += conv(planes, planes * 4, 1, out_h, out_w)
        inplanes, h, w = planes * 4, out_h, out_w
    return total


def forward_flops(
    config: BiomedGPTConfig,
    batch: int,
    text_len: int,
    target_len: int,
    image_size: tuple[int, int] | None = None,
    kept_patches: int | None = None,
) -> int:
    """FLOPs of one forward over a padded batch: [batch, text_len] source, [batch, target_len] decoder input,
    optional [batch, 3, H, W] images of which ``kept_patches`` patches are kept (all when None)."""
    d = config.d_model
    image_tokens, image_part = 0, 0
    if image_size is not None:
        grid = ((image_size[0] + 15) // 16) * ((image_size[1] + 15) // 16)
        image_tokens = grid if kept_patches is None else min(kept_patches, grid)
        image_part = resnet_flops(config, *image_size) + 2 * image_tokens * config.image_feature_dim * d
    s, t = image_tokens + text_len, target_len

    def attention(q_len: int, k_len: int) -> int:
        return 2 * q_len * d * d * 2 + 2 * k_len * d * d * 2 + 2 * 2 * q_len * k_len * d  # q,o + k,v + scores, mix

    encoder = 2 * 2 * s * d * d + 2 * s * s * d  # position q/k projections and their product
    encoder += config.encoder_layers * (attention(s, s) + 2 * 2 * s * d * config.encoder_ffn_dim)
    decoder = 2 * 2 * t * d * d + 2 * t * t * d  # self-attention position bias
    decoder += 2 * t * d * d + 2 * s * d * d + 2 * t * s * d  # cross-attention position bias
    decoder += config.decoder_layers * (attention(t, t) + attention(t, s) + 2 * 2 * t * d * config.decoder_ffn_dim)
    decoder += 2 * t * d * config.vocab_size  # tied output projection
    return batch * (image_part + encoder + decoder)


def training_flops(forward: int) -> int:
    """Forward + backward: the backward pass costs two forwards (gradients of inputs and of weights)."""
    return 3 * forward
