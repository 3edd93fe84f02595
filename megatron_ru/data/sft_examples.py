"""SFT data: JSON lines → token ids + loss masks (.bin/.idx pairs), and padded / packed SFT samples.

On disk an SFT dataset is two Megatron indexed datasets with the same document boundaries:
`PREFIX.bin/.idx` (token ids) and `PREFIX_loss_mask.bin/.idx` (uint8, 1 = the token is a target:
an assistant reply or its end-of-turn token). The usual mmap reader, splits and blending serve it.

Samples are rows of `seq_length + 1` tokens with three aligned arrays: "text" (ids), "loss_mask"
(0/1 per token) and "segment" (which conversation of the row a token belongs to, -1 = padding).
`--sft-packing pad` puts one conversation in a row; `packed` fills rows with whole conversations
in a seeded order (next fit). `sft_batch` turns a batch into model inputs: the label of position j
is token j + 1, counted only when that token is a target of the same conversation.
"""
from __future__ import annotations

import json
import warnings
from typing import Optional

import numpy as np

from .blended import BlendedDataset, blend_sample_counts, parse_data_path, parse_split, split_boundaries
from .chat_templates import ChatError, ChatTemplate, check_messages
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dataset_exists
from .order import DatasetConfigError

PACKING = ("pad", "packed")
SPLIT_NAMES = ("train", "valid", "test")


def mask_prefix(prefix: str) -> str:
    return prefix + "_loss_mask"


def template_record(prefix: str) -> str:
    """Where preprocessing records the chat template it rendered PREFIX with (Jinja source);
    training copies it into its checkpoints as tokenizer/chat_template.jinja."""
    return prefix + "_chat_template.jinja"


# ---- preprocessing --------------------------------------------------------------------------
def record_to_example(record, *, template: ChatTemplate, tokenizer, prompt_key: str = "prompt",
                      response_key: str = "response", system_key: str = "system",
                      train_on_prompt: bool = False, where: str = "record") -> tuple[list, list]:
    """One JSON object → (ids, loss mask). Forms: {"messages": [...]}, {prompt_key, response_key}
    (optional system_key) and {"text"} (plain text: every token is a target, EOD appended)."""
    if not isinstance(record, dict):
        raise ChatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif prompt_key in record or response_key in record:
        prompt, response = record.get(prompt_key), record.get(response_key)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ChatError(f"{where}: {prompt_key!r} and {response_key!r} must both be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if isinstance(record.get(system_key), str):
            messages.insert(0, {"role": "system", "content": record[system_key]})
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ChatError(f"{where}: 'text' must be a non-empty string")
        ids = tokenizer.tokenize(record["text"]) + [tokenizer.eod]
        return ids, [1] * len(ids)
    else:
        raise ChatError(f"{where}: expected 'messages', '{prompt_key}'/'{response_key}' or 'text'")
    messages = check_messages(messages, where, training=True)  # the order of training turns
    enc = template.encode(tokenizer, messages, train_on_prompt=train_on_prompt, where=where)
    return enc.ids, enc.loss_mask


def write_sft_dataset(records, prefix: str, dtype, **encode_kwargs) -> dict:
    """Encodes (where, record) pairs into PREFIX(.bin/.idx) and PREFIX_loss_mask(.bin/.idx).
    Both pairs are written under temporary names and renamed only when all records are good."""
    counts = {"conversations": 0, "tokens": 0, "targets": 0}
    with IndexedDatasetBuilder(prefix, dtype) as ids_out, \
            IndexedDatasetBuilder(mask_prefix(prefix), np.uint8) as mask_out:
        for where, record in records:
            ids, mask = record_to_example(record, where=where, **encode_kwargs)
            ids_out.add_document(np.asarray(ids, dtype=np.int64))
            mask_out.add_document(np.asarray(mask, dtype=np.uint8))
            counts["conversations"] += 1
            counts["tokens"] += len(ids)
            counts["targets"] += int(sum(mask))
        if counts["conversations"] == 0:
            raise ChatError(f"no conversation in the input for {prefix}")
    return counts


def read_jsonl(path: str):
    """(PATH:LINE, object) for every non-blank line; a bad line (not UTF-8, not JSON, a string with
    a lone surrogate escape such as "\\ud800") is a ChatError naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ChatError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the "
                                "line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ChatError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            _check_strings(record, where)
            yield where, record


def _check_strings(value, where: str) -> None:
    """Every string of a parsed record is encodable text (JSON lets "\\ud800" through alone)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ChatError(f"{where}: a string holds a lone surrogate "
                                f"\\u{ord(v[exc.start]):04x} (a JSON escape that is not a "
                                "character)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


# ---- samples ----------------------------------------------------------------------------------
def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, packing: str) -> list[list[int]]:
    """Rows of document ids in `order`; `packed` appends to the open row while the total stays
    <= capacity (next fit), `pad` gives every document its own row."""
    if packing == "pad":
        return [[int(d)] for d in order]
    rows, row, used = [], [], 0
    for d in order:
        n = int(lengths[d])
        if row and used + n > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(d))
        used += n
    if row:
        rows.append(row)
    return rows


class SFTDataset:
    """Rows of `seq_length + 1` tokens from a document range of an SFT pair; epochs are seeded
    permutations of the conversations, packed into rows, repeated until `num_samples` rows."""

    def __init__(self, prefix: str, documents, *, name: str, seq_length: int, num_samples: Optional[int],
                 seed: int, packing: str = "pad", overlong: str = "truncate", pad_id: int = 0) -> None:
        if packing not in PACKING:
            raise DatasetConfigError(f"--sft-packing {packing!r}: expected one of {PACKING}")
        self.tokens, self.mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
        if len(self.tokens.document_indices) != len(self.mask.document_indices) or \
                not np.array_equal(self.tokens.sizes, self.mask.sizes):
            raise DatasetConfigError(f"{mask_prefix(prefix)}.idx does not match {prefix}.idx "
                                     "(different documents or lengths): rerun preprocessing")
        self.prefix, self.name, self.seq_length, self.pad_id = prefix, name, seq_length, pad_id
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise DatasetConfigError(f"the {name} split of {prefix} has no conversations")
        cap = seq_length + 1
        doc_len = np.diff(self.tokens.document_indices)
        lengths = np.zeros(len(doc_len), dtype=np.int64)
        lo = self.tokens.document_indices[:-1]
        for d in documents:  # tokens per document (documents may hold several sequences)
            lengths[d] = int(self.tokens.sizes[lo[d]:lo[d] + doc_len[d]].sum())
        over = int((lengths[documents] > cap).sum())
        if over:
            if overlong == "error":
                first = int(documents[lengths[documents] > cap][0])
                raise DatasetConfigError(f"{prefix}: {over} conversations are longer than --seq-length "
                                         f"{seq_length} + 1 tokens (first: document {first}, "
                                         f"{lengths[first]} tokens); --sft-overlong truncate cuts them")
            warnings.warn(f"{prefix} ({name}): {over} of {documents.size} conversations are longer "
                          f"than {cap} tokens and are truncated")
        self.lengths = np.minimum(lengths, cap)
        rng = np.random.RandomState(seed % 2**32)
        self.rows: list[list[int]] = []
        while True:
            self.rows += pack_rows(self.lengths, rng.permutation(documents), cap, packing)
            if num_samples is None or len(self.rows) >= num_samples:
                break
        if num_samples is not None:
            self.rows = self.rows[:num_samples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        cap = self.seq_length + 1
        text = np.full(cap, self.pad_id, dtype=np.int64)
        mask = np.zeros(cap, dtype=np.int64)
        segment = np.full(cap, -1, dtype=np.int64)
        pos = 0
        for k, d in enumerate(self.rows[idx]):
            n = int(self.lengths[d])
            text[pos:pos + n] = self.tokens.document(d)[:n]
            mask[pos:pos + n] = self.mask.document(d)[:n]
            segment[pos:pos + n] = k
            pos += n
        return {"text": text, "loss_mask": mask, "segment": segment}


def build_sft_datasets(data_path, split, seq_length, seed, num_samples, *, packing="pad",
                       overlong="truncate", pad_id=0, vocab_size=None, tokenizer_fingerprint=None,
                       cache_path=None, warn=None):
    """(train, valid, test) SFT datasets (None when empty), blends weighted like pretraining.
    Every prefix and its loss mask are validated first, as pretraining data is (data/validate.py:
    index structure, ids against `vocab_size`, the tokenizer record), and the mask must be 0/1."""
    from .validate import DataValidationError, validate_dataset
    blend = parse_data_path(data_path)
    for _, prefix in blend:
        if not dataset_exists(mask_prefix(prefix)):
            raise DatasetConfigError(f"--dataset-type sft: {mask_prefix(prefix)}.bin/.idx is missing "
                                     "(preprocess with tools/preprocess_data.py --dataset-type sft)")
        validate_dataset(IndexedDataset(prefix), vocab_size=vocab_size, fingerprint=tokenizer_fingerprint,
                         cache_path=cache_path, warn=warn)
        stats = validate_dataset(IndexedDataset(mask_prefix(prefix)), cache_path=cache_path)
        if stats["min_id"] < 0 or stats["max_id"] > 1:
            raise DataValidationError(f"{mask_prefix(prefix)}: loss-mask values "
                                      f"{stats['min_id']}..{stats['max_id']}, expected 0 or 1")
    fractions = parse_split(split)
    sizes = {p: len(IndexedDataset(p).document_indices) - 1 for _, p in blend}
    bounds = {p: split_boundaries(fractions, sizes[p]) for _, p in blend}
    result = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        parts = [(w, p) for w, p in blend if bounds[p][s + 1] > bounds[p][s]]
        if wanted == 0 or not parts:
            result.append(None)
            continue
        counts = [wanted] if len(parts) == 1 else \
            blend_sample_counts([w / sum(w for w, _ in parts) for w, _ in parts], wanted)
        members = [SFTDataset(p, np.arange(*bounds[p][s:s + 2]), name=name, seq_length=seq_length,
                              num_samples=c, seed=seed + s, packing=packing, overlong=overlong,
                              pad_id=pad_id) for (_, p), c in zip(parts, counts)]
        result.append(members[0] if len(parts) == 1 else
                      BlendedDataset(members, [w for w, _ in parts], wanted))
    return tuple(result)


def sft_batch(batch: dict, *, packed: bool) -> dict:
    """Collated SFT rows → tokens, labels, loss_mask (B, S); packed rows also get positions that
    restart per conversation and an attention mask (B, 1, S, S), True = masked out, that keeps
    each query inside its own conversation."""
    import torch
    text, mask, seg = (torch.as_tensor(batch[k], dtype=torch.long) for k in ("text", "loss_mask", "segment"))
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    s_in, s_out = seg[:, :-1], seg[:, 1:]
    loss_mask = (mask[:, 1:].bool() & (s_out == s_in) & (s_out >= 0)).float()
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": None,
           "attention_mask": None}
    if packed:
        b, t = tokens.shape
        arange = torch.arange(t).expand(b, t)
        starts = torch.zeros_like(arange)
        starts[:, 1:] = torch.where(s_in[:, 1:] != s_in[:, :-1], arange[:, 1:], 0)
        out["position_ids"] = arange - torch.cummax(starts, dim=1).values
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
        out["attention_mask"] = ~(causal & (s_in[:, :, None] == s_in[:, None, :]))[:, None]
    return out


def run_sft(args, files: list, stream) -> list:
    """tools/preprocess_data.py --dataset-type sft: all input files → one SFT pair at
    --output-prefix (PREFIX.bin/.idx + PREFIX_loss_mask.bin/.idx) and the chat template used
    (PREFIX_chat_template.jinja)."""
    import itertools
    import os

    from .chat_templates import load_template
    from .indexed_dataset import best_fitting_dtype
    from .tokenizers import build_tokenizer
    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                tokenizer_model=args.tokenizer_model, eod_token=args.eod_token)
    tok_file = args.vocab_file or args.tokenizer_model
    tok_dir = tok_file if tok_file and os.path.isdir(tok_file) else os.path.dirname(tok_file or "")
    template = load_template(args.chat_template, tokenizer, tok_dir or None)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    records = itertools.chain.from_iterable(read_jsonl(f) for f in files)
    counts = write_sft_dataset(records, args.output_prefix, best_fitting_dtype(tokenizer.vocab_size),
                               template=template, tokenizer=tokenizer, prompt_key=args.prompt_key,
                               response_key=args.response_key, train_on_prompt=args.train_on_prompt)
    from ..files import atomic_write_text
    from .validate import tokenizer_files, write_tokenizer_record
    atomic_write_text(template_record(args.output_prefix), template.source)  # carried into checkpoints
    write_tokenizer_record(args.output_prefix, tokenizer_type=args.tokenizer_type,  # read by training
                           vocab_size=tokenizer.vocab_size,
                           files=tokenizer_files(args.vocab_file, args.merge_file, args.tokenizer_model))
    stream.write(f"wrote {args.output_prefix}.bin/.idx and {mask_prefix(args.output_prefix)}.bin/.idx: "
                 f"{counts['conversations']} conversations, {counts['tokens']} tokens, "
                 f"{counts['targets']} in the loss ({template.name})\n")
    return [args.output_prefix]
