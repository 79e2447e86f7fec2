"""Transcoders: the rules of a transcoder ensemble and the names it is saved under.

A transcoder (Dunefsky et al. 2024, arXiv:2406.11944) encodes one hook of a forward pass (an MLP's input,
`blocks.L.ln2.hook_normalized`) and predicts another (its output, `blocks.L.hook_mlp_out`):
    f = act(x_in W_enc + b_enc)         y_hat = f W_dec + b_dec  (+ x_in W_skip^T, the skip transcoder)
W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in] (zero at init). The input is not
centred by b_dec (SAELens' transcoders require apply_b_dec_to_input False). saetool.ensemble.stack trains them.

Saved in the SAELens layout (sae_lens/saes/transcoder.py, 6.54): cfg.json gains d_out and apply_b_dec_to_input
false, and "architecture" is SAELens' transcoder name (`saved_architecture`): transcoder (ReLU), skip_transcoder,
jumprelu_transcoder, jumprelu_skip_transcoder. BatchTopK and Matryoshka BatchTopK infer with a JumpReLU threshold
(as their SAEs, saetool.saes.batchtopk), so they are saved as the JumpReLU transcoders. SAELens has no TopK
transcoder: a TopK one is saved as "topk_transcoder" / "topk_skip_transcoder", which saetool loads and SAELens
refuses. Gated has no transcoder form (its auxiliary loss reconstructs the input through a frozen decoder).
"""

from __future__ import annotations

# trained architecture -> the activation of its saved transcoder (its inference form)
_SAVED_ACTIVATION = {"standard": "", "jumprelu": "jumprelu_", "batchtopk": "jumprelu_",
                     "matryoshka_batchtopk": "jumprelu_", "topk": "topk_"}
TRANSCODER_ARCHITECTURES = tuple(_SAVED_ACTIVATION)
# saved transcoder architecture -> the saetool architecture that reads it (for folders written by SAELens)
SAVED_TRANSCODERS = {f"{act}{skip}transcoder": arch for arch, act in
                     (("standard", ""), ("jumprelu", "jumprelu_"), ("topk", "topk_")) for skip in ("", "skip_")}


def check_transcoder(architecture: str, transcoder: bool, skip_connection: bool, tied: bool = False,
                     decoder_norm_l1: bool = False) -> None:
    """ValueError (one line, naming the flag) for a transcoder setting that cannot act: an architecture without a
    transcoder form (gated), tied weights (W_enc and W_dec map different spaces), skip_connection without a target."""
    if skip_connection and not transcoder:
        raise ValueError("--skip_connection needs --target_hook (a skip connection maps a transcoder's input to its "
                         "output)")
    if not transcoder:
        return
    if architecture not in TRANSCODER_ARCHITECTURES:
        raise ValueError(f"--target_hook: architecture {architecture!r} has no transcoder form; use one of "
                         f"{', '.join(TRANSCODER_ARCHITECTURES)}")
    if tied:
        raise ValueError("--tied cannot act on a transcoder (W_enc reads the input hook, W_dec writes the target)")
    if decoder_norm_l1:
        raise ValueError("--decoder_norm_l1 applies to SAEs only, not to transcoders (--target_hook)")


def check_sweep_flags(cfg) -> None:
    """SweepConfig.validate's transcoder rules (ValueError, one line naming the flag): --skip_connection needs
    --target_hook; a transcoder cannot take --tied, --decoder_norm_l1, --normalize_activations (its input and target
    scales differ), --resample_every (resampling re-encodes the input as its own target) or --array (one foreign
    array holds one hook). Architectures without a transcoder form are refused by ARCHITECTURE_FLAGS."""
    transcoder = cfg.target_hook is not None
    check_transcoder(cfg.architecture, transcoder, cfg.skip_connection, cfg.tied, cfg.decoder_norm_l1)
    if not transcoder:
        return
    refused = {"normalize_activations": cfg.normalize_activations != "none", "resample_every": cfg.resample_every,
               "array": cfg.array is not None}
    for flag, given in refused.items():
        if given:
            raise ValueError(f"--{flag} cannot act on a transcoder (--target_hook); train without it")
    if cfg.target_hook == cfg.hook_name:
        raise ValueError(f"--target_hook {cfg.target_hook} is --hook_name itself; a transcoder predicts another hook "
                         "(drop --target_hook to train an SAE)")


def saved_architecture(architecture: str, skip_connection: bool) -> str:
    """The cfg.json "architecture" of a transcoder trained as `architecture` (see the module docstring)."""
    return f"{_SAVED_ACTIVATION[architecture]}{'skip_' if skip_connection else ''}transcoder"


def is_transcoder_cfg(cfg: dict) -> bool:
    """True for a cfg.json of a transcoder (its architecture is one of SAVED_TRANSCODERS)."""
    return cfg.get("architecture") in SAVED_TRANSCODERS


def has_skip(cfg: dict) -> bool:
    """True for a skip transcoder's cfg.json (it has W_skip [d_out, d_in])."""
    return is_transcoder_cfg(cfg) and "skip_" in cfg["architecture"]
