"""BiomedGPT model configuration and the published size presets (BiomedGPT models/ofa/ofa.py)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Layer-1..3 block counts of the ResNet image backbone (no layer4), as chosen by ``resnet_type`` in
# BiomedGPT models/ofa/unify_transformer.py, TransformerEncoder.__init__.
RESNET_LAYERS: dict[str, tuple[int, int, int]] = {
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}

# name -> (encoder layers, decoder layers, d_model, ffn dim, heads, resnet): the ofa_{tiny,medium,base,large,huge}
# architectures of BiomedGPT models/ofa/ofa.py (xlarge = ofa_huge).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(encoder_layers=4, decoder_layers=4, d_model=256, ffn_dim=1024, heads=4, resnet_type="resnet50"),
    "medium": dict(encoder_layers=4, decoder_layers=4, d_model=512, ffn_dim=2048, heads=8, resnet_type="resnet101"),
    "base": dict(encoder_layers=6, decoder_layers=6, d_model=768, ffn_dim=3072, heads=12, resnet_type="resnet101"),
    "large": dict(encoder_layers=12, decoder_layers=12, d_model=1024, ffn_dim=4096, heads=16, resnet_type="resnet152"),
    "xlarge": dict(encoder_layers=24, decoder_layers=12, d_model=1280, ffn_dim=5120, heads=16, resnet_type="resnet152"),
}

# Trainable parameter counts with the 59,457-token vocabulary (the model card table of the OFA README.md gives
# them rounded: 33M, 93M, 180M, 470M, 930M).
PUBLISHED_PARAMETER_COUNTS: dict[str, int] = {
    "tiny": 33_488_336,
    "medium": 92_892_000,
    "base": 182_238_536,
    "large": 472_977_152,
    "xlarge": 929_486_848,
}

ORIGINAL_VOCAB_SIZE = 59_457


def size_settings(name: str) -> dict[str, Any]:
    """The BiomedGPTConfig keyword arguments of a published size (BiomedGPT models/ofa/ofa.py architectures)."""
    size = MODEL_SIZES[name]
    return dict(
        d_model=size["d_model"],
        encoder_layers=size["encoder_layers"],
        decoder_layers=size["decoder_layers"],
        encoder_attention_heads=size["heads"],
        decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn_dim"],
        decoder_ffn_dim=size["ffn_dim"],
        resnet_type=size["resnet_type"],
    )


ATTENTION_BACKENDS = ("sdpa", "reference", "triton")
RESNET_NORMS = ("batch", "frozen", "sync")


class BiomedGPTConfig(PretrainedConfig):
    """Hyper-parameters of the OFA-architecture encoder-decoder used by BiomedGPT.

    Names follow the transformers OFA port where one exists, so configs of converted checkpoints read naturally.
    Defaults are the flags every BiomedGPT run script passes (e.g. BiomedGPT scripts/pretrain/pretrain_tiny.sh,
    scripts/vqa/train_vqa_rad_beam_scale.sh) over the defaults of models/ofa/ofa.py, at the ``tiny`` size.
    """

    model_type = "biomedgpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        vocab_size: int = ORIGINAL_VOCAB_SIZE,
        d_model: int = 256,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        encoder_attention_heads: int = 4,
        decoder_attention_heads: int = 4,
        encoder_ffn_dim: int = 1024,
        decoder_ffn_dim: int = 1024,
        resnet_type: str = "resnet50",
        resnet_norm: str = "batch",
        image_feature_dim: int = 1024,
        max_position_embeddings: int = 1024,
        token_bucket_size: int = 256,
        image_bucket_size: int = 42,
        code_image_size: int = 128,
        num_bins: int = 1000,
        code_dict_size: int = 8192,
        attn_scale_factor: float = 2.0,
        normformer: bool = True,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        encoder_drop_path_rate: float = 0.1,
        decoder_drop_path_rate: float = 0.1,
        resnet_drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        attention_backend: str = "sdpa",
        use_cache: bool = True,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        unk_token_id: int = 3,
        decoder_start_token_id: int = 0,
        forced_eos_token_id: int = 2,
        is_encoder_decoder: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.resnet_type = resnet_type
        self.resnet_norm = resnet_norm
        self.image_feature_dim = image_feature_dim
        self.max_position_embeddings = max_position_embeddings
        self.token_bucket_size = token_bucket_size
        self.image_bucket_size = image_bucket_size
        self.code_image_size = code_image_size
        self.num_bins = num_bins
        self.code_dict_size = code_dict_size
        self.attn_scale_factor = attn_scale_factor
        self.normformer = normformer
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.encoder_drop_path_rate = encoder_drop_path_rate
        self.decoder_drop_path_rate = decoder_drop_path_rate
        self.resnet_drop_path_rate = resnet_drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        self.attention_backend = attention_backend
        self.use_cache = use_cache
        self.unk_token_id = unk_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            forced_eos_token_id=forced_eos_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings with a message that says which key to change."""
        for layers_key, heads_key in (
            ("encoder_layers", "encoder_attention_heads"),
            ("decoder_layers", "decoder_attention_heads"),
        ):
            if getattr(self, layers_key) < 1:
                raise ValueError(f"{layers_key} must be >= 1, got {getattr(self, layers_key)}")
            heads = getattr(self, heads_key)
            if heads < 1 or self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} must be divisible by {heads_key}={heads}")
        if self.resnet_type not in RESNET_LAYERS:
            raise ValueError(f"resnet_type={self.resnet_type!r}; choose one of {sorted(RESNET_LAYERS)}")
        if self.resnet_norm not in RESNET_NORMS:
            raise ValueError(f"resnet_norm={self.resnet_norm!r}; choose one of {list(RESNET_NORMS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}; choose one of {list(ATTENTION_BACKENDS)}")
        for key in (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "encoder_drop_path_rate",
            "decoder_drop_path_rate",
            "resnet_drop_path_rate",
        ):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must lie in [0, 1), got {value}")
        min_vocab = 4 + 1 + self.code_dict_size + self.num_bins
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size={self.vocab_size} cannot hold 4 specials, <mask>, {self.code_dict_size} codes and "
                f"{self.num_bins} bins (needs > {min_vocab}); take vocab_size from the tokenizer (len(tokenizer))"
            )
        if self.code_image_size % 8:
            raise ValueError(f"code_image_size={self.code_image_size} must be a multiple of 8 (VQ-GAN stride)")

    @property
    def resnet_layers(self) -> tuple[int, int, int]:
        return RESNET_LAYERS[self.resnet_type]

    @property
    def code_grid_size(self) -> int:
        """Side of the VQ-code grid the decoder writes for image infilling (16 for 128 px codes)."""
        return self.code_image_size // 8

    @classmethod
    def for_size(cls, name: str, **overrides: Any) -> BiomedGPTConfig:
        """Config of a published size (``tiny``, ``medium``, ``base``, ``large``, ``xlarge``)."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; choose one of {list(MODEL_SIZES)}")
        kwargs = size_settings(name)
        kwargs.update(overrides)
        return cls(**kwargs)
