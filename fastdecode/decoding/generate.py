"""``fastdecode.generate``: exact decoding of transformers causal LMs, plain or with lookahead."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fastdecode.decoding.drafter import Drafter, NoDraft
from fastdecode.decoding.loop import GenerateStats, decode
from fastdecode.decoding.path_processors import PathProcessors
from fastdecode.decoding.sampling import SamplingConfig
from fastdecode.decoding.token_outputs import TokenOutputs, stopping_check
from fastdecode.hf.model import TreeRunner, check_cache

DRAFTING = ("plain", "jacobi", "trie", "prompt_lookup")  # how a step drafts; sampling is do_sample
# Shorthands for plain decoding that also say how tokens are chosen.
PLAIN_SHORTHANDS = {"greedy": False, "sample": True}  # strategy: do_sample
JACOBI_DEFAULTS = (7, 5, 7)  # (W, N, G): a window as wide as the candidates are many
JACOBI_AUTO_BOUNDS = (7, 10, 8)  # long candidates pay off where the output copies the prompt
TRIE_DEFAULTS = (16, 8)  # (decoding_length, branch_length)
TRIE_AUTO_BOUNDS = (64, 12)
# transformers' own values for what neither the call nor the generation config sets
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                     "min_p": None}


@dataclass
class GenerateOutput:
    """sequences: int64 ``[B, L + n]``, laid out as transformers' ``generate`` returns them
    (the prompts as given, then the new tokens, finished rows padded with the pad token).
    stats: see :class:`fastdecode.decoding.loop.GenerateStats`. scores, logits (with
    ``output_scores`` / ``output_logits``): n fp32 ``[B, V]`` tensors, one per new token
    column, as transformers returns them: the processed (and, when sampling, warped) scores
    and the raw logits each token was chosen from; a row that had finished holds zeros.
    past_key_values: the transformers cache of the call (full layers). For one row it holds the
    KV of every token of ``sequences`` but the last, so that passing it back with
    ``sequences`` plus the next turn's tokens continues without re-encoding; for a batch,
    row b's valid keys start after its left padding and end at its own length."""

    sequences: torch.Tensor
    stats: GenerateStats
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: object | None = None


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, found {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, found {value}")
    return value


def _settings(given: dict[str, int | None], defaults: tuple[int, ...],
              lows: tuple[int, ...]) -> list[int]:
    """The given settings, each checked to be an int >= its low bound, defaults for None."""
    return [_int(name, default if value is None else value, low)
            for (name, value), default, low in zip(given.items(), defaults, lows)]


def _left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the prompts and their mask; right-padded rows are moved to the left padding
    transformers uses for decoder-only models."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be an int64 tensor, found "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [B, L] with B, L >= 1, found "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"found {tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on "
                         f"{input_ids.device}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask leaves a row with no tokens")
    L = input_ids.shape[1]
    cols = torch.arange(L, device=input_ids.device)
    left = cols >= (L - lengths)[:, None]
    if torch.equal(mask.bool(), left):
        return input_ids, mask
    # Not left-padded: gather each row's real tokens, in order, to the right end.
    order = torch.sort(mask, dim=-1, stable=True).indices
    moved = input_ids.gather(1, order)
    return torch.where(left, moved, pad_id), left.long()


def _new_tokens(max_new_tokens: int | None, max_length: int | None, prompt_len: int,
                gen_cfg: object) -> int:
    """The new-token budget as transformers reads it: ``max_new_tokens``, else ``max_length``
    minus the prompt's padded length, else the generation config's ``max_new_tokens``, else
    its ``max_length`` (transformers' default 20) minus the prompt."""
    if max_new_tokens is not None:
        if max_length is not None:
            warnings.warn(f"both max_new_tokens={max_new_tokens} and max_length={max_length} "
                          "are set; max_new_tokens takes precedence", UserWarning, stacklevel=3)
        return _int("max_new_tokens", max_new_tokens, 0)
    if max_length is not None:
        return max(_int("max_length", max_length, 1) - prompt_len, 0)
    configured = getattr(gen_cfg, "max_new_tokens", None)
    if configured is not None:
        return _int("generation_config.max_new_tokens", configured, 0)
    length = getattr(gen_cfg, "max_length", None)
    return max(_int("generation_config.max_length", 20 if length is None else length, 1)
               - prompt_len, 0)


def _configured(name: str, value: object, gen_cfg: object) -> object:
    """``value`` if given, else the generation config's, else transformers' default."""
    if value is not None:
        return value
    configured = getattr(gen_cfg, name, None)
    return configured if configured is not None else SAMPLING_DEFAULTS[name]


def _path_processors(gen_cfg: object, eos_ids: list[int], min_new_tokens: int | None,
                     repetition_penalty: float | None, no_repeat_ngram_size: int | None,
                     logits_processor) -> PathProcessors:
    """The call's history-dependent processors, the generation config's values where the
    call gives None."""
    if min_new_tokens is None:
        min_new_tokens = getattr(gen_cfg, "min_new_tokens", None) or 0
    if repetition_penalty is None:
        repetition_penalty = getattr(gen_cfg, "repetition_penalty", None)
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = getattr(gen_cfg, "no_repeat_ngram_size", None) or 0
    custom = []
    if _int("no_repeat_ngram_size", no_repeat_ngram_size, 0) > 0:
        from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

        custom.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    for processor in logits_processor or ():
        if not callable(processor):
            raise TypeError(f"logits_processor must hold callables (transformers "
                            f"LogitsProcessor), found {type(processor).__name__}")
        custom.append(processor)
    return PathProcessors(_int("min_new_tokens", min_new_tokens, 0), tuple(eos_ids),
                          repetition_penalty, tuple(custom))


def _warn_unused_sampling(given: dict[str, object]) -> None:
    """transformers' warning for sampling arguments given to greedy decoding."""
    unused = [f"{name}={value!r}" for name, value in given.items() if value is not None]
    if unused:
        warnings.warn(f"do_sample is False, so {', '.join(unused)} "
                      f"{'is' if len(unused) == 1 else 'are'} not used: greedy decoding takes "
                      "the most likely token; pass do_sample=True to sample", UserWarning,
                      stacklevel=4)


def _sampling(strategy: str, gen_cfg: object, do_sample: bool | None,
              temperature: float | None, top_k: int | None, top_p: float | None,
              min_p: float | None) -> tuple[str, SamplingConfig]:
    """How the call drafts (``strategy`` with its plain shorthands resolved) and chooses
    tokens (the given sampling arguments, the generation config's for None); warns where
    transformers would (sampling arguments that greedy decoding ignores)."""
    names = DRAFTING + tuple(PLAIN_SHORTHANDS)
    if strategy not in names:
        raise ValueError(f"strategy must be one of {', '.join(names)}, found {strategy!r}")
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    do_sample, temperature, top_k, top_p, min_p = (
        _configured(name, value, gen_cfg)
        for name, value in [("do_sample", do_sample), *given.items()])
    if strategy == "greedy" and do_sample:
        warnings.warn("strategy='greedy' with do_sample=True samples; pass strategy='plain' "
                      "with do_sample=True (or strategy='sample') instead", DeprecationWarning,
                      stacklevel=3)
    do_sample = bool(do_sample) or PLAIN_SHORTHANDS.get(strategy, False)
    if not do_sample:
        _warn_unused_sampling({
            "temperature": None if given["temperature"] in (None, 1.0) else temperature,
            "top_k": given["top_k"], "top_p": None if given["top_p"] in (None, 1.0) else top_p,
            "min_p": given["min_p"]})
    drafting = "plain" if strategy in PLAIN_SHORTHANDS else strategy
    return drafting, SamplingConfig(do_sample=do_sample, temperature=temperature,
                                    top_k=None if top_k == 0 else top_k, top_p=top_p,
                                    min_p=min_p)


def _special_tokens(gen_cfg: object, eos_token_id: int | list[int] | None,
                    pad_token_id: int | None) -> tuple[list[int], int]:
    """The EOS ids (the given ones, else the generation config's) and the pad id (the given
    one, else the generation config's, else the first EOS id, else 0)."""
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    eos_ids = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad_id = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
    pad_id = _int("pad_token_id", pad_id, 0) if pad_id is not None else (
        eos_ids[0] if eos_ids else 0)
    return eos_ids, pad_id


def _check_positions(model, limit: int | None, mask: torch.Tensor, max_new_tokens: int) -> None:
    """A model with ``limit`` learned positions must hold the longest prompt of ``mask``
    ``[B, L]`` and every new token but the last (whose position is never run)."""
    longest = int(mask.sum(-1).max())
    if limit is not None and max_new_tokens > 0 and longest + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{type(model).__name__} has {limit} learned positions (max_position_embeddings): "
            f"the longest prompt ({longest} tokens) plus max_new_tokens - 1 must fit in them, "
            f"found {longest} + {max_new_tokens} - 1 = {longest + max_new_tokens - 1}")


def _drafter(drafting: str, auto: bool, vocab: int, jacobi: list[int], trie: list[int], *,
             pool_from_prompt: bool, generator: torch.Generator | None,
             trie_cache: object | None) -> Drafter:
    """The drafter of ``drafting`` ("plain", "jacobi", "trie" or "prompt_lookup"; adaptive
    with ``auto``) for a vocabulary of ``vocab`` tokens: ``jacobi`` holds (W, N, G),
    ``trie`` (decoding_length, branch_length)."""
    if drafting == "jacobi" and auto:
        from fastdecode.decoding.auto_jacobi import AutoJacobi

        return AutoJacobi(vocab, *jacobi, pool_from_prompt=pool_from_prompt, generator=generator)
    if drafting == "jacobi":
        from fastdecode.decoding.jacobi import JacobiDrafter

        return JacobiDrafter(vocab, *jacobi, pool_from_prompt=pool_from_prompt,
                             generator=generator)
    if drafting == "trie" and auto:
        from fastdecode.decoding.auto_trie import AutoTrie

        return AutoTrie(vocab, *trie, cache=trie_cache)
    if drafting in ("trie", "prompt_lookup"):
        from fastdecode.decoding.trie_drafter import TrieDrafter

        return TrieDrafter(vocab, *trie, cache=trie_cache,
                           single_branch=drafting == "prompt_lookup")
    return NoDraft()


def generate(model, input_ids: torch.Tensor, *, strategy: str = "jacobi",
             max_new_tokens: int | None = None, max_length: int | None = None,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None,
             min_new_tokens: int | None = None, repetition_penalty: float | None = None,
             no_repeat_ngram_size: int | None = None, logits_processor=None,
             stopping_criteria=None, output_scores: bool | None = None,
             output_logits: bool | None = None, return_dict_in_generate: bool | None = None,
             generation_config=None, past_key_values=None,
             generator: torch.Generator | None = None,
             window: int | None = None, ngram: int | None = None, guesses: int | None = None,
             pool_from_prompt: bool = True, decoding_length: int | None = None,
             branch_length: int | None = None,
             trie_cache=None, config: str | None = None, streamer=None) -> GenerateOutput:
    """Generates with ``model`` (a transformers causal LM), exactly.

    Args:
        model: a transformers causal LM on the attention interface (tests/test_families.py
            covers Llama, Qwen2/3, Mistral, Phi3, GPT-2, GPT-NeoX, OLMo2, Granite, Qwen3-MoE,
            Mixtral, Gemma2/3, sliding windows and soft-capping included), with
            ``attn_implementation`` "sdpa", "eager" or "fastdecode".
        input_ids: int64 ``[B, L]`` prompts on the model's device; padded rows need
            ``attention_mask`` (left padding as transformers expects; right padding is moved).
        strategy: how a step drafts: "plain" (no drafts, one token a step), "jacobi"
            (lookahead decoding: a W x (N-1) Jacobi window and an n-gram pool), "trie"
            (multi-branch drafts retrieved from a token trie of the prompt and output) or
            "prompt_lookup" (the trie's best single chain); the last three verify several
            tokens a step. Each chooses tokens greedily or by sampling as ``do_sample`` says.
            "greedy" and "sample" are shorthands for "plain" with ``do_sample`` False and
            True ("greedy" with ``do_sample=True`` samples and warns).
        max_new_tokens: the most new tokens per row. max_length: the most tokens per row,
            the (padded) prompt included, used when ``max_new_tokens`` is not given. With
            neither, the model's generation config decides (its ``max_new_tokens``, else its
            ``max_length``, 20 by default), as in transformers.
        eos_token_id: token(s) that end a row (kept in the output); default: the model's
            generation config.
        pad_token_id: the token that pads rows that finished early; default: the generation
            config's, else the first EOS token, else 0.
        do_sample, temperature, top_k, top_p, min_p, generator: sampling (temperature,
            top-k, top-p and min-p applied in transformers' order). What the call leaves None
            comes from the generation config, else transformers' defaults (greedy; when
            sampling, temperature 1, top_k 50, top_p 1); ``top_k=0`` keeps every token. Every
            emitted token is drawn from the processed distribution; seeded runs are
            reproducible but not token-identical to transformers' sampling. With
            ``do_sample=False`` a given ``temperature`` other than 1, ``top_k``, ``top_p``
            other than 1 or ``min_p`` warns, as transformers does, and greedy decoding
            ignores it.
        stopping_criteria: transformers ``StoppingCriteria`` (a ``StoppingCriteriaList`` or a
            list), asked after every new token of every row with the row's sequence
            ``[1, len]`` (left padding included) and that token's scores ``[1, V]``; a row
            ends at the first token any of them accepts (kept) and is padded after it, as
            transformers does when an EOS token is set (without one, transformers' stopped
            rows go on until every row is done).
        output_scores, output_logits: also return every new token's scores / logits (see
            :class:`GenerateOutput`). return_dict_in_generate: accepted for transformers'
            sake; the result is always a :class:`GenerateOutput`.
        past_key_values: the ``past_key_values`` of an earlier call on one row, whose
            ``sequences`` ``input_ids`` starts with (a multi-turn chat): only the tokens after
            what it holds are encoded. It is extended in place and returned.
        generation_config: a transformers ``GenerationConfig`` read instead of the model's
            own for every default above (budget, EOS, padding, processors, outputs).
        min_new_tokens: no EOS before this many new tokens; repetition_penalty: every token
            already in the sequence has its logit divided by it (multiplied where negative).
            Both as in transformers (default: the generation config's), applied to every
            draft node along its own path, so greedy output stays identical to transformers'
            and sampling exact.
        no_repeat_ngram_size: no n-gram of this size twice (transformers'
            ``NoRepeatNGramLogitsProcessor``; default: the generation config's).
        logits_processor: transformers ``LogitsProcessor`` objects (a list), applied after the
            built-in ones and before the sampling warpers, like transformers does, to every
            draft node with the node's own sequence ``[n, len]`` (left padding included).
        window, ngram, guesses: jacobi's W >= 1, N >= 2 and G >= 0 (default 7, 5, 7; with
            ``config="auto"`` they are bounds, default 7, 10, 8).
        pool_from_prompt: seed jacobi's n-gram pool with the prompt's n-grams.
        decoding_length, branch_length: trie drafts' nodes (root included, >= 1) and depth
            (>= 0), default 16 and 8 (with ``config="auto"`` the node count is chosen each
            step up to ``decoding_length``, default 64 and 12); "prompt_lookup" drafts one
            chain of ``branch_length`` tokens.
        trie_cache: a :class:`fastdecode.decoding.TrieCache` to draft from and keep (it
            persists across calls, so repeated workloads warm up); default: a fresh one.
        config: None for the given settings, or "auto" (jacobi and trie): what is verified
            each step is chosen from this device's measured forward costs and the call's
            running acceptance estimate, within the bounds above: jacobi's candidates
            (``ngram``, ``guesses``; the window, ``window`` columns, runs only where extra
            tokens are nearly free) or the trie's node count. The output is the same either
            way.
        streamer: an object with transformers' streamer interface (``put``/``end``); it
            receives the prompts, then one token per row at a time (``[B]``, pad for rows
            that are done).

    Returns:
        :class:`GenerateOutput` with ``sequences``, ``stats``, ``past_key_values`` and, when
        asked for, ``scores`` and ``logits``.
    """
    if generation_config is not None and not hasattr(generation_config, "max_length"):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, found "
                        f"{type(generation_config).__name__}")
    gen_cfg = generation_config if generation_config is not None else getattr(
        model, "generation_config", None)
    drafting, sampling = _sampling(strategy, gen_cfg, do_sample, temperature, top_k, top_p,
                                   min_p)
    if config not in (None, "auto"):
        raise ValueError(f"config must be None or 'auto', found {config!r}")
    if config == "auto" and drafting not in ("jacobi", "trie"):
        raise ValueError(f"config='auto' applies to strategy 'jacobi' or 'trie', found {strategy!r}")
    auto = config == "auto"
    trie = _settings(dict(decoding_length=decoding_length, branch_length=branch_length),
                     TRIE_AUTO_BOUNDS if auto else TRIE_DEFAULTS, (1, 0))
    jacobi = _settings(dict(window=window, ngram=ngram, guesses=guesses),
                       JACOBI_AUTO_BOUNDS if auto else JACOBI_DEFAULTS, (1, 2, 0))
    runner = TreeRunner(model)
    want_scores = bool(getattr(gen_cfg, "output_scores", False)
                       if output_scores is None else output_scores)
    want_logits = bool(getattr(gen_cfg, "output_logits", False)
                       if output_logits is None else output_logits)
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        max_new_tokens = _new_tokens(max_new_tokens, max_length, input_ids.shape[1], gen_cfg)
    elif max_new_tokens is not None:  # input_ids itself is rejected below
        _int("max_new_tokens", max_new_tokens, 0)
    eos_ids, pad_id = _special_tokens(gen_cfg, eos_token_id, pad_token_id)
    device = model.get_output_embeddings().weight.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    ids, mask = _left_padded(input_ids, attention_mask, pad_id)
    if past_key_values is not None:
        check_cache(past_key_values, ids, mask)
    vocab = model.config.vocab_size
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"input_ids holds token ids outside the vocabulary [0, {vocab})")
    _check_positions(model, runner.position_limit, mask, max_new_tokens)
    if getattr(gen_cfg, "num_beams", 1) not in (None, 1):
        raise ValueError(f"generation_config asks for beam search (num_beams="
                         f"{gen_cfg.num_beams}), which fastdecode.generate does not run")
    processors = _path_processors(gen_cfg, eos_ids, min_new_tokens, repetition_penalty,
                                  no_repeat_ngram_size, logits_processor)
    drafter = _drafter(drafting, auto, vocab, jacobi, trie, pool_from_prompt=pool_from_prompt,
                       generator=generator, trie_cache=trie_cache)
    outputs = TokenOutputs(ids.shape[0], want_scores, want_logits) \
        if want_scores or want_logits else None
    stop = stopping_check(stopping_criteria) if stopping_criteria is not None else None
    sequences, stats = decode(runner, drafter, ids, mask, max_new_tokens=max_new_tokens,
                              eos_ids=eos_ids, pad_id=pad_id, sampling=sampling,
                              generator=generator, streamer=streamer, processors=processors,
                              stop=stop, outputs=outputs, cache=past_key_values)
    if not torch.equal(ids, input_ids):
        sequences[:, : input_ids.shape[1]] = input_ids
    scores, logits = outputs.assemble(sequences.shape[1] - ids.shape[1]) if outputs else (None, None)
    cache = runner.cache if runner.cache is not None else past_key_values
    if cache is not None and sequences.shape[0] == 1:
        extra = cache.get_seq_length() - (sequences.shape[1] - 1)
        if extra > 0:  # drafts accepted past the budget or EOS
            cache.crop(-extra)
    return GenerateOutput(sequences, stats, scores, logits, cache)
