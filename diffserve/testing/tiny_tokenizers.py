"""Small, locally trained stand-ins for the CLIP and T5/UMT5 tokenizers of the target models.

Test fixtures cannot download the real tokenizer files, so both vocabularies are learned here from a
small built-in English corpus (:data:`CORPUS`), run by the ``tokenizers`` library's BPE / Unigram
models, and wrapped in the real ``transformers`` classes so that ``save_pretrained`` writes the files
the pipelines load (``tokenizer.json`` + ``tokenizer_config.json``; the fixture builder adds CLIP's
``vocab.json`` / ``merges.txt``, which is what the real CLIP tokenizer folders contain). The learning
is done by small Python routines rather than ``tokenizers.trainers``, whose results vary from process
to process (hash-order tie breaking), because fixtures must be byte-for-byte reproducible.

* :func:`build_clip_tokenizer` -- byte-level BPE laid out exactly like OpenAI CLIP's vocabulary:
  the 256 byte symbols, the same 256 symbols with the ``</w>`` end-of-word suffix, one entry per merge
  (in merge order), then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids. Because every
  byte is in the vocabulary, any text tokenizes without unknown tokens. ``<|endoftext|>`` being the
  highest id matters: CLIP text configs carry the legacy ``eos_token_id=2`` and then pool at
  ``input_ids.argmax(-1)``, which is only the end-of-text position if that token has the largest id.
* :func:`build_t5_tokenizer` -- Unigram (SentencePiece-style, ``▁`` word boundaries) with the T5 id
  layout ``<pad>=0``, ``</s>=1``, ``<unk>=2``, no ``<extra_id_*>`` sentinels. Printable ASCII and the
  Latin-1 letters are seeded into the alphabet, so English text never maps to ``<unk>``; other
  characters (emoji, CJK, ...) do.

Both builders are deterministic across processes and machines, and cached per process.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

from diffserve.pipelines.hunyuan_video import CROP_START as HUNYUAN_CROP_START
from diffserve.pipelines.hunyuan_video import PROMPT_TEMPLATE as HUNYUAN_PROMPT_TEMPLATE

CLIP_VOCAB_SIZE = 1000
"""Size of the tiny CLIP vocabulary, special tokens included (real CLIP: 49408)."""
T5_VOCAB_SIZE = 512
"""Size of the tiny T5 vocabulary, special tokens included (real t5-v1_1: 32100, umt5: 256300)."""
CLIP_MODEL_MAX_LENGTH = 77
T5_MODEL_MAX_LENGTH = 512

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_T5_MAX_PIECE = 12
T5_SPECIALS = ("<pad>", "</s>", "<unk>")

CORPUS = """
A photo of a cat. A photo of a dog. A painting of a squirrel eating a burger.
Dance monkey, dance! Bad quality, low quality, worst quality, blurry, ugly, deformed, negative.
Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.
A red circle on the left, a blue square on the right, a green triangle at the top and a yellow star
at the bottom. An orange hexagon in the middle, a purple heart in the center, a pink diamond in the
corner, a white cross above a black arrow, a brown cube below a grey sphere, a gray cylinder next to a
golden cone, a silver ring behind a cyan oval, a magenta rectangle in front of a beige pyramid.
Red, orange, yellow, green, blue, indigo, violet, purple, pink, white, black, gray, grey, brown, gold,
silver, cyan, magenta, teal, navy, maroon, olive, lime, beige, turquoise, crimson, scarlet, amber.
Circle, square, triangle, rectangle, star, heart, diamond, hexagon, pentagon, octagon, oval, cube,
sphere, cone, cylinder, pyramid, arrow, cross, line, dot, spiral, wave, grid, stripe, checkerboard.
Left, right, top, bottom, middle, center, above, below, behind, under, over, inside, outside, near,
far, next to, between, around, across, along, through, upward, downward, forward, backward.
A man and a woman walk along the beach at sunset while a child plays with a ball in the sand.
The old wooden house stands on a hill under a cloudy sky; rain falls on the quiet village street.
A bird flies over the river. A fish swims in the clear water. A horse runs across the green field.
A lion sleeps under a tree. An elephant drinks from a lake. A rabbit jumps over a small fence.
A cup of coffee on a table, a glass of water, a bowl of fruit with apples, bananas and oranges.
A car drives down the road at night; bright lights shine through the fog in the busy city.
A robot barista making latte art in a cozy cafe. A calm ocean wave at sunrise. A red fox trotting
through a snowy pine forest at golden hour, cinematic. A lively puppy running quickly on lush grass.
A penguin is standing on a yellow surfboard, riding a wave in the ocean with waves crashing around.
A train is moving on the track. A plane flies high above the mountains and the snow covered peaks.
Beautiful, detailed, realistic, cinematic, sharp focus, high resolution, masterpiece, soft lighting,
studio light, natural light, dramatic shadows, wide angle, close up, portrait, landscape, aerial view.
Static, overexposed, subtitles, style, works, paintings, images, still picture, messy background,
three legs, many people in the background, walking backwards, extra fingers, poorly drawn hands,
poorly drawn faces, disfigured, misshapen limbs, fused fingers, JPEG compression residue, incomplete.
One, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9, first, second, last.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
I am, you are, he is, she is, it is, we are, they are, I was, it was, we were, there is, there are.
This, that, these, those, here, there, where, when, what, which, who, why, how, all, some, many, few.
Big, small, tall, short, long, wide, narrow, thick, thin, heavy, light, fast, slow, hot, cold, warm,
new, old, young, happy, sad, angry, calm, loud, quiet, soft, hard, smooth, rough, wet, dry, clean.
Sun, moon, sky, cloud, rain, snow, wind, storm, fire, ice, stone, rock, sand, grass, flower, leaf,
tree, forest, mountain, river, lake, sea, ocean, beach, island, desert, valley, garden, park, road.
Person, people, man, woman, boy, girl, child, baby, friend, family, teacher, doctor, artist, dancer.
Hand, head, face, eye, eyes, nose, mouth, hair, arm, leg, foot, body, smile, shirt, dress, hat, shoes.
Run, walk, jump, swim, fly, dance, sing, play, read, write, eat, drink, sleep, look, see, watch, hold,
open, close, turn, move, stand, sit, fall, rise, spin, roll, float, glow, shine, sparkle, melt, grow.
Video, image, picture, frame, scene, camera, shot, movie, film, animation, cartoon, drawing, sketch,
render, 3d, 4k, 8k, hd, photograph, photography, illustration, oil painting, watercolor, pixel art.
"""
"""English text the tiny tokenizers are trained on: colours, shapes, positions, prompt words."""

_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.strip().splitlines() if line.strip()]


def _clip_pre_tokenizer() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """The normalizer and pre-tokenizer transformers' ``CLIPTokenizer`` uses (lowercase, regex, bytes)."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre_tokenizer


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    """Learn CLIP-style byte-level BPE merges (``</w>`` marks word ends) on the corpus, in rank order.

    A plain Python learner rather than ``tokenizers.trainers.BpeTrainer``: the Rust trainer breaks ties
    between equally frequent pairs in hash-map order, which changes from process to process, and the
    fixtures must be byte-for-byte reproducible. Ties here go to the lexicographically smallest pair.
    """
    normalizer, pre_tokenizer = _clip_pre_tokenizer()
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in _corpus_lines():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[(*word[:-1], word[-1] + "</w>")] += 1
    words = dict(counts)
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            raise RuntimeError(f"corpus yields only {len(merges)} BPE merges, need {n_merges}")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge(word, best): freq for word, freq in words.items()}
    return tuple(merges)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP vocabulary (token -> id, CLIP's layout) and merge list."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_rank)
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = list(_clip_merges())
    tokens += [a + b for a, b in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate token in tiny CLIP vocabulary")
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def _byte_order() -> dict[str, int]:
    """GPT-2 ``bytes_to_unicode`` order, which is the order of the first 256 CLIP vocabulary entries."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): rank for rank, c in enumerate(cs)}


def _byte_rank(symbol: str) -> int:
    return _byte_order()[symbol]


def build_clip_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with :data:`CLIP_VOCAB_SIZE` tokens and ``model_max_length`` 77."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MODEL_MAX_LENGTH)


@functools.lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """The tiny T5 Unigram vocabulary as ``(piece, log-probability)`` pairs, specials first.

    Built like SentencePiece's seed vocabulary, without its EM pruning: every alphabet character, then
    the most useful substrings of the ``▁``-prefixed corpus words (ranked by frequency x extra length,
    ties by string), scored by log relative frequency. ``tokenizers.trainers.UnigramTrainer`` is not
    used because its output changes from process to process; this is deterministic.
    """
    counts: collections.Counter[str] = collections.Counter()
    for line in _corpus_lines():
        for word in line.split():
            word = "▁" + word
            for i in range(len(word)):
                for j in range(i + 1, min(len(word), i + _T5_MAX_PIECE) + 1):
                    counts[word[i:j]] += 1
    alphabet = ["▁"] + [chr(c) for c in range(33, 127)]
    alphabet += [chr(c) for c in range(0xC0, 0x100) if chr(c).isalpha()]
    n_pieces = T5_VOCAB_SIZE - len(T5_SPECIALS) - len(alphabet)
    longer = sorted((p for p in counts if len(p) > 1 and counts[p] > 1), key=lambda p: (-counts[p] * (len(p) - 1), p))
    if len(longer) < n_pieces:
        raise RuntimeError(f"corpus yields only {len(longer)} T5 pieces, need {n_pieces}")
    pieces = alphabet + sorted(longer[:n_pieces], key=lambda p: (-counts[p], p))
    total = sum(max(counts[p], 1) for p in pieces)
    vocab = [(p, 0.0) for p in T5_SPECIALS]
    vocab += [(p, round(math.log(max(counts[p], 1) / total), 6)) for p in pieces]
    return tuple(vocab)


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (saved as ``T5TokenizerFast``-compatible ``tokenizer.json``), no sentinel ids."""
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------------
# Qwen2 (Qwen2.5-VL text encoder of Qwen-Image / Qwen-Image-Edit)

QWEN2_VOCAB_SIZE = 1024
"""Regular (byte-level BPE) tokens of the tiny Qwen2 vocabulary, ids 0..1023 (real Qwen2: 151643). The
special tokens keep their real ids (151643 and up), so configs that name them need no change."""
QWEN2_MODEL_MAX_LENGTH = 131072

QWEN2_SYSTEM_TEXT = (
    ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
     "relationships of the objects and background:\n"),
    ("system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
     "then explain how the user's text instruction should alter or modify the image. Generate a new image that "
     "meets the user's requirements while maintaining consistency with the original input where appropriate.\n"),
    "\nuser\n",
    "\nassistant\n",
)
"""The plain text of Qwen-Image's prompt templates (the special tokens around it removed). Its pre-tokens
are learned first, so that, as with the real vocabulary, every word of the templates is one token and the
fixed prefixes the pipelines drop (34 tokens for text-to-image, 64 for editing) are exactly the templates'
system turns."""
_QWEN2_SYSTEM_WEIGHT = 10_000
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _qwen2_pre_tokenize(text: str) -> list[str]:
    """Qwen2's pre-tokenization (NFC, its split regex, byte-level symbols) of text without special tokens."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return [piece for piece, _ in pre.pre_tokenize_str(normalizers.NFC().normalize_str(text))]


@functools.lru_cache(maxsize=1)
def _qwen2_merges() -> tuple[tuple[str, str], ...]:
    """Byte-level BPE merges (no word-end marker, as Qwen2) learned on the template text (weighted so that
    its words are merged whole first) and the corpus; ties go to the lexicographically smallest pair."""
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in QWEN2_SYSTEM_TEXT:
        for piece in _qwen2_pre_tokenize(text):
            counts[tuple(piece)] += _QWEN2_SYSTEM_WEIGHT
    for line in _corpus_lines():
        for piece in _qwen2_pre_tokenize(line):
            counts[tuple(piece)] += 1
    words = {w: f for w, f in counts.items() if len(w) > 1}
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for word, freq in words.items():
        for pair in itertools.pairwise(word):
            pairs[pair] += freq
    n_merges = QWEN2_VOCAB_SIZE - 256
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = +pairs  # drop pairs whose count fell to 0
        if not pairs:
            raise RuntimeError(f"corpus yields only {len(merges)} Qwen2 BPE merges, need {n_merges}")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word in [w for w in words if best[0] in w and best in itertools.pairwise(w)]:
            freq = words.pop(word)
            merged = _merge(word, best)
            pairs.subtract({p: freq * n for p, n in collections.Counter(itertools.pairwise(word)).items()})
            pairs.update({p: freq * n for p, n in collections.Counter(itertools.pairwise(merged)).items()})
            words[merged] = words.get(merged, 0) + freq
    return tuple(merges)


def qwen2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny Qwen2 regular vocabulary (the 256 byte symbols in GPT-2 order, then one token per merge) and
    its merge list."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_rank)
    merges = list(_qwen2_merges())
    tokens += [a + b for a, b in merges]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate token in tiny Qwen2 vocabulary")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_qwen2_tokenizer(added_tokens: dict[int, tuple[str, bool]]) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` with the tiny regular vocabulary and the real checkpoint's added tokens at their
    real ids (``added_tokens``: id -> (content, special), as a tokenizer_config.json's
    ``added_tokens_decoder`` lists them); eos ``<|im_end|>``, pad ``<|endoftext|>``, no unk or bos."""
    vocab, merges = qwen2_vocab_and_merges()
    if min(added_tokens) < len(vocab):
        raise ValueError(f"added token ids start at {min(added_tokens)}, inside the {len(vocab)}-token vocabulary")
    vocab.update({content: i for i, (content, _) in sorted(added_tokens.items())})
    specials = [content for _, (content, special) in sorted(added_tokens.items()) if special]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=QWEN2_MODEL_MAX_LENGTH,
                         additional_special_tokens=[s for s in specials if s != "<|endoftext|>"])
    tok.add_tokens([AddedToken(content, special=False, normalized=False)
                    for _, (content, special) in sorted(added_tokens.items()) if not special])
    return tok


# ---------------------------------------------------------------------------------------------------------
# LLaMA (the LLaVA-LLaMA-3 text encoder of HunyuanVideo)

LLAMA_VOCAB_SIZE = 1816
"""Size of the tiny LLaMA vocabulary, special tokens included, and the tiny encoder's embedding rows (real:
128256 tokens, 128320 rows)."""
LLAMA_MODEL_MAX_LENGTH = 2048
LLAMA_BOS, LLAMA_EOS, LLAMA_PAD = "<|begin_of_text|>", "<|end_of_text|>", "<pad>"
LLAMA_CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# HunyuanVideo's prompt template and crop are the recipe's own (one copy): with the real tokenizer the part
# before the prompt is 95 tokens, the `crop_start` the pipeline drops; the tiny LLaMA tokenizer is laid out so it
# is 95 there too (see :func:`build_llama_tokenizer`).
HUNYUAN_VIDEO_TEMPLATE = HUNYUAN_PROMPT_TEMPLATE
HUNYUAN_VIDEO_CROP_START = HUNYUAN_CROP_START


@functools.lru_cache(maxsize=1)
def llama_pieces() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The tiny LLaMA BPE: (single symbols, merges) in rank order.

    SentencePiece layout (``▁`` marks a preceding space, as transformers 5's ``LlamaTokenizer`` expects):
    every letter run of the corpus and of the template is one piece, ``▁``-prefixed where a space precedes
    it; the few words that start a chat-turn section ("system", "user", "Describe") also bare; ``\\n\\n``
    is one piece; digits and punctuation are single symbols (a digit after a space is ``▁`` + digit). Each
    piece is reached by left-to-right merges, the ``▁`` pieces ranked first so a bare piece never splits
    one. Built directly (no trainer), so it is deterministic.
    """
    import re

    text = "\n".join(_corpus_lines()) + "\n" + HUNYUAN_VIDEO_TEMPLATE
    for special in (*LLAMA_CHAT_SPECIALS, "{}"):
        text = text.replace(special, "\n")
    spaced = sorted({"▁" + m.group()[1:] for m in re.finditer(r" [A-Za-z]+", text)}, key=lambda p: (len(p), p))
    symbols = sorted({c for c in text if not c.isspace()} | {"▁", "\n"})
    seen, merges = set(symbols), []
    for piece in [*spaced, *sorted({"system", "user", "Describe", "\n\n"})]:
        for i in range(2, len(piece) + 1):
            if piece[:i] not in seen:
                seen.add(piece[:i])
                merges.append((piece[:i - 1], piece[i - 1]))
    return tuple(symbols), tuple(merges)


def build_llama_tokenizer():
    """A LLaMA-3-style ``LlamaTokenizer`` (SentencePiece-style BPE with byte fallback, right padding, BOS
    ``<|begin_of_text|>``, the chat header tokens as special tokens, pad ``<pad>``) whose tokenization of
    :data:`HUNYUAN_VIDEO_TEMPLATE`'s prefix is exactly :data:`HUNYUAN_VIDEO_CROP_START` tokens."""
    from transformers import LlamaTokenizer

    symbols, merges = llama_pieces()
    tokens = ["<unk>", LLAMA_BOS, LLAMA_EOS] + [f"<0x{i:02X}>" for i in range(256)] + list(symbols)
    tokens += [a + b for a, b in merges]
    tok = LlamaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges), bos_token=LLAMA_BOS,
                         eos_token=LLAMA_EOS, unk_token="<unk>", add_bos_token=True, padding_side="right",
                         model_max_length=LLAMA_MODEL_MAX_LENGTH)
    tok.add_special_tokens({"additional_special_tokens": list(LLAMA_CHAT_SPECIALS), "pad_token": LLAMA_PAD})
    if len(tok) != LLAMA_VOCAB_SIZE:
        raise RuntimeError(f"tiny LLaMA vocabulary has {len(tok)} tokens, not LLAMA_VOCAB_SIZE")
    prefix = len(tok(HUNYUAN_VIDEO_TEMPLATE.split("{}")[0]).input_ids)
    if prefix != HUNYUAN_VIDEO_CROP_START:
        raise RuntimeError(f"the template prefix is {prefix} tiny LLaMA tokens, not {HUNYUAN_VIDEO_CROP_START}")
    return tok
