"""`data`: what `rayft prepare` reads and how it cleans, splits, tokenizes and packs it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayft.config.section import Section


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for the test split.")
    seed: int = Field(0, description="Salt of the content hash that assigns rows to splits.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("data.split.validation + data.split.test must be below 1")
        return self


class DedupeConfig(Section):
    exact: bool = Field(
        True,
        description="Drop rows whose content (whitespace collapsed, case and punctuation kept) "
        "repeats exactly.",
    )
    near: bool = Field(
        True,
        description="Drop near-duplicates (MinHash/LSH over word shingles of the non-system turns).",
    )
    near_threshold: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity above which rows are near-duplicate "
        "candidates; a candidate is removed only if its content words match too (a number, "
        "name, product or negation that differs keeps both rows).",
    )
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Words per shingle for near-dedupe.")


class PIIConfig(Section):
    enabled: bool = Field(True, description="Replace PII with typed placeholders such as <EMAIL>.")
    types: list[Literal["email", "phone", "credit_card", "ip_address", "iban"]] = Field(
        default_factory=lambda: ["email", "phone", "credit_card", "ip_address", "iban"],
        description="Which kinds of PII to scrub.",
    )


class DataConfig(Section):
    train_files: list[str] = Field(
        default_factory=list,
        description="Input files or globs (JSONL, JSON, Parquet), local or s3://.",
    )
    validation_files: list[str] = Field(
        default_factory=list,
        description="Explicit validation files; when given, no validation rows are split off.",
    )
    test_files: list[str] = Field(
        default_factory=list,
        description="Explicit test files; when given, no test rows are split off.",
    )
    format: Literal[
        "auto",
        "chat",
        "alpaca",
        "sharegpt",
        "prompt_completion",
        "text",
        "preference",
        "reinforcement",
        "kto",
    ] = Field(
        "auto",
        description="Row format; `auto` detects it per file and says what it found "
        "(with training.objective: grpo, chat rows and rows with a prompt but no answer are "
        "read as `reinforcement` prompts; rows with prompt, completion and label are `kto`).",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="`fail`: stop before writing any split and list the errors. `skip`: write "
        "rejected rows with their reason to rejects.jsonl and go on.",
    )
    max_seq_len: int = Field(1024, ge=16, description="Tokens per training sequence (and pack).")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with an example longer than max_seq_len."
    )
    normalize: bool = Field(
        True,
        description="Unicode NFC, line endings, invisible/control characters, trailing whitespace; "
        "indentation kept.",
    )
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII scrubbing.")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="Deduplication.")
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="Train/validation/test split."
    )
    assistant_only_loss: bool = Field(
        True, description="Mask labels (-100) everywhere but assistant turns."
    )
    pack: bool = Field(True, description="Pack examples into max_seq_len sequences for training.")
    batch_size: int = Field(
        1024,
        ge=1,
        description="Rows per Ray Data batch (blocks hold 4 batches: each task costs Ray Data "
        "~0.15 s of scheduling, so small blocks leave the CPUs idle).",
    )
