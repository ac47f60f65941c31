"""Shared pieces of the RLGF scripts: tasks and data, loading models, rewards and metrics, guides, generation,
the settings and the run harness. The algorithm logic lives in the top-level scripts.

In layers: CORE is what every script imports, and all that a copy of ppo.py into another project needs (with
GUIDED for the four guided scripts); each of EXTRAS is imported only when its flag asks for it.
tests/test_copy_script.py runs ppo.py copied with CORE alone (and resumes it with resume.py added), and checks
that a run imports no extra.
"""

CORE = ("__init__.py", "errors.py", "settings.py", "harness.py", "runtime.py", "tasks.py", "presets.py",
        "generation.py", "chat.py", "rewards.py", "metrics.py", "models.py")
"""every script: settings and harness, run plumbing (checkpoints written), tasks and data, loading a given model,
generation and the training forward of causal LMs, the prompt format (chat.py: a tokenizer's special tokens), rewards,
metrics"""
GUIDED = ("guides.py",)
"""the guided scripts (ppo_plus_plus, aggrevated, lols, d2lols): the guide interface, its settings' checks, building
the guide (model, rule, learner), the rule guides"""
EXTRAS = {
    "embedded.py": "no --policy-model or --guide-model where one is needed (the task's embedded models), or a "
                   "model alias (--policy-model smollm2); python -m common.embedded",
    "lora.py": "--lora-r > 0 (with it --load-in-4bit / --load-in-8bit, --critic adapter), or a PEFT adapter as "
               "--reward-model",
    "fsdp.py": "--fsdp",
    "server_guide.py": "--guide http://HOST:PORT/v1",
    "resume.py": "--resume RUN_DIR",
    "seq2seq.py": "an encoder-decoder --policy-model or --guide-model (T5, BART)",
    "chat_template.py": "--chat-template on, or auto (the default) with a model whose tokenizer has a chat template",
    "start_eval.py": "--start-eval-from RUN_FOLDER",
}
"""module -> the flags that import it"""
