"""flashattn as a Hugging Face transformers attention backend (flashattn.integrations.transformers).

Tiny randomly initialised models built in code (no downloads), one per attention flavour:
Llama (GQA), Qwen2 (GQA, one full and one sliding-window layer), Mistral (GQA, sliding window
smaller than the prompt), GPT-2 (MHA, no GQA). The same weights run with attn_implementation
"fattn" and with transformers' own "eager" and "sdpa"; logits and parameter gradients must agree
at every real (non-pad) position, and greedy generate() with the KV cache must pick the same tokens.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):   # added in transformers 4.54
    pytest.skip("these tests switch implementations with model.set_attn_implementation (transformers >= 4.54)",
                allow_module_level=True)

from flashattn.integrations.transformers import register  # noqa: E402

NAME = register()
VOCAB, SEQLEN, PAD = 100, 12, 0


def make_config(kind: str, hidden: int = 64, heads: int = 4, kv_heads: int = 2, init: float = 0.2):
    """2 layers; init 0.2 (not 0.02) makes attention peaked, so a wrong mask or window shows in the logits.
    No eos token: generate() always runs max_new_tokens steps."""
    tokens = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, initializer_range=init)
    if kind == "gpt2":   # multi-head attention (GPT-2 has no GQA)
        return transformers.GPT2Config(n_positions=256, n_embd=hidden, n_layer=2, n_head=heads,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **tokens)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, **tokens)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":   # layer 0 full attention, layer 1 a sliding window of 5
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1, **common)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=4, **common)
    raise ValueError(kind)


KINDS = ["llama", "qwen2", "mistral", "gpt2"]


def make_model(kind: str, device="cpu", dtype=torch.float32, **config_kwargs):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(kind, **config_kwargs), attn_implementation=NAME)
    return model.to(device=device, dtype=dtype).eval()


def make_batch(padding, batch=3, seqlen=SEQLEN, device="cpu", seed=0):
    """input_ids (batch, seqlen) and attention_mask (1 = token) with sequences of seqlen, seqlen - 5, seqlen - 2
    tokens, padded on `padding` ("left", "right"; None: no padding at all)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=g)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if padding is not None:
        for b, n_pad in enumerate([0, 5, 2][:batch]):
            pads = slice(0, n_pad) if padding == "left" else slice(seqlen - n_pad, seqlen)
            mask[b, pads] = 0
            ids[b, pads] = PAD
    return ids.to(device), mask.to(device)


def forward_backward(model, impl, ids, mask, **kwargs):
    """Logits and parameter gradients of a fixed random loss over the real tokens, under `impl`."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, **kwargs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits)
    (logits * weights)[mask.bool()].sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def rel_err(ours, ref, mask=None):
    if mask is not None:   # compare real tokens only: what pad positions hold differs by design
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_same(name, ours, ref, rtol, mask=None):
    err = rel_err(ours.float(), ref.float(), mask)
    assert err <= rtol, f"{name}: max|ours - ref| / max|ref| = {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------------------------------------------
# CPU tier, float32


def test_register_and_build():
    assert NAME == "fattn"
    assert NAME in transformers.AttentionInterface()
    model = make_model("llama")
    assert model.config._attn_implementation == NAME
    with pytest.raises(ValueError, match="flash"):   # transformers would look for a flash_attn kernel
        register("flashattn")


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_grads_match_eager_and_sdpa(kind, padding):
    model = make_model(kind)
    ids, mask = make_batch(padding)
    ours_logits, ours_grads = forward_backward(model, NAME, ids, mask)
    for baseline in ("eager", "sdpa"):
        logits, grads = forward_backward(model, baseline, ids, mask)
        assert_same(f"{kind}/{baseline} logits", ours_logits, logits, 1e-4, mask)
        assert grads.keys() == ours_grads.keys()
        for name in grads:
            assert_same(f"{kind}/{baseline} grad of {name}", ours_grads[name], grads[name], 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches_eager(kind):
    """Greedy decoding with the KV cache on a left-padded batch: prefill, then one query against the cache."""
    model = make_model(kind)
    ids, mask = make_batch("left")
    tokens = {}
    for impl in (NAME, "eager"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=PAD)[:, SEQLEN:]
    assert torch.equal(tokens[NAME], tokens["eager"]), f"{tokens[NAME].tolist()} != {tokens['eager'].tolist()}"


def test_generate_static_cache_matches_eager():
    """A static cache has more key slots than tokens so far: the empty ones must not be attended."""
    model = make_model("llama")
    ids, mask = make_batch("left")
    tokens = {}
    for impl in (NAME, "eager"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                                      cache_implementation="static")[:, SEQLEN:]
    assert torch.equal(tokens[NAME], tokens["eager"]), f"{tokens[NAME].tolist()} != {tokens['eager'].tolist()}"


@pytest.mark.parametrize("given", ["position_ids", "cu_seqlens"])
def test_packed_sequences_match_separate_runs(given):
    """No attention_mask, three sequences packed in one row (varlen): found from position_ids restarting
    at 0, or given as transformers' flash kwargs (what DataCollatorWithFlattening produces)."""
    model = make_model("llama")
    ids, _ = make_batch(None, batch=1)
    lengths = [5, 4, 3]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kwargs = {}
    if given == "cu_seqlens":
        cu_seqlens = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=5, max_length_k=5)
    model.set_attn_implementation(NAME)
    packed = model(ids, position_ids=position_ids, use_cache=False, **kwargs).logits
    model.set_attn_implementation("eager")
    separate = torch.cat([model(part, use_cache=False).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert_same("packed logits", packed, separate, 1e-4)


def test_bidirectional_config_matches_eager():
    """config.is_causal = False turns a decoder into a bidirectional encoder (transformers' "power feature")."""
    torch.manual_seed(0)
    config = make_config("llama")
    config.is_causal = False
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=NAME).eval()
    ids, mask = make_batch("right")
    ours, _ = forward_backward(model, NAME, ids, mask, use_cache=False)
    ref, _ = forward_backward(model, "eager", ids, mask, use_cache=False)
    assert_same("bidirectional logits", ours, ref, 1e-4, mask)


def additive_mask(mask):
    """The 4D float mask (batch, 1, seqlen, seqlen) of causal attention over the real tokens: 0 or min."""
    seqlen = mask.shape[1]
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_4d_mask_left_padding_matches_2d():
    model = make_model("llama")
    ids, mask = make_batch("left")
    model.set_attn_implementation(NAME)
    ours = model(ids, attention_mask=additive_mask(mask)).logits
    model.set_attn_implementation("eager")
    ref = model(ids, attention_mask=mask).logits
    assert_same("logits with a 4D mask", ours, ref, 1e-4, mask)


@pytest.mark.parametrize("which", ["right-padding", "bidirectional"])
def test_4d_mask_flashattn_cannot_express_raises(which):
    """A 4D mask that is not causal attention over left-padded sequences raises instead of computing something else."""
    model = make_model("llama")
    ids, mask = make_batch("right")
    mask4d = additive_mask(mask) if which == "right-padding" else torch.zeros(3, 1, SEQLEN, SEQLEN)
    with pytest.raises(NotImplementedError, match="4D attention_mask"):
        model(ids, attention_mask=mask4d)


def test_attention_dropout_applies_in_training_only():
    """Attention dropout > 0: applied in training (reproducible under torch.manual_seed), not in eval."""
    torch.manual_seed(0)
    config = make_config("gpt2")
    config.attn_pdrop = 0.3
    config.resid_pdrop = config.embd_pdrop = 0.0   # only attention dropout differs between the runs
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=NAME)
    ids, mask = make_batch("left")
    a = model.eval()(ids, attention_mask=mask).logits
    b = model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(1)
    c = model.train()(ids, attention_mask=mask).logits
    torch.manual_seed(1)
    d = model.train()(ids, attention_mask=mask).logits
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert (c - a)[mask.bool()].abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# bfloat16, longer sequences: the GPU tier (Triton kernels) and the same check on the CPU (torch path).
# Judged like the kernel tests: against float32 eager, ours may be at most about as wrong as transformers'
# own bf16 sdpa.


def check_bf16(kind, device, new_tokens=8):
    # hidden 256, head dim 64; init 0.05 keeps bf16 rounding moderate (about 1% of the logits)
    model = make_model(kind, device=device, dtype=torch.bfloat16, hidden=256, init=0.05)
    reference = copy.deepcopy(model).float()
    ids, mask = make_batch("left", seqlen=200, device=device)
    ref_logits, ref_grads = forward_backward(reference, "eager", ids, mask)
    ours_logits, ours_grads = forward_backward(model, NAME, ids, mask)
    sdpa_logits, sdpa_grads = forward_backward(model, "sdpa", ids, mask)
    err, sdpa_err = rel_err(ours_logits.float(), ref_logits, mask), rel_err(sdpa_logits.float(), ref_logits, mask)
    assert err <= 2 * sdpa_err + 1e-2, f"logits: {err:.2e} vs sdpa's {sdpa_err:.2e}"
    for name in ref_grads:
        err = rel_err(ours_grads[name].float(), ref_grads[name])
        sdpa_err = rel_err(sdpa_grads[name].float(), ref_grads[name])
        assert err <= 2 * sdpa_err + 2e-2, f"grad of {name}: {err:.2e} vs sdpa's {sdpa_err:.2e}"

    # generate(): every token ours picks must be a greedy choice of float32 eager, up to bf16 rounding
    # (a near-tie may flip): re-score our sequence with the reference and compare with its best token.
    model.set_attn_implementation(NAME)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], new_tokens)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)   # as generate() counts them (GPT-2's are absolute)
    with torch.no_grad():
        logits = reference(out, attention_mask=full_mask, position_ids=position_ids).logits[:, -new_tokens - 1:-1]
    gap = logits.max(-1).values - logits.gather(-1, out[:, -new_tokens:, None]).squeeze(-1)
    slack = 2 * (sdpa_logits.float() - ref_logits)[mask.bool()].abs().max() + 1e-2
    assert (gap <= slack).all(), f"greedy tokens off by {gap.max().item():.3g} logits (allowed {slack.item():.3g})"


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_matches_float32_eager(kind, device):
    check_bf16(kind, device)
