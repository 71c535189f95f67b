"""Evaluation the LLaVA-1.5 way: answer LLaVA question files (`answer`), score answer files with the benchmarks'
own rules (`scorers`, `scoring`), and an lmms-eval model plugin (`lmms_eval_model`, registered by `lmms_plugin`).

Layer: above the facade (`vlm.api`), below the command line; see docs/evaluation.md.
"""
