"""Open-QA on a frozen REALM index: ORQA-style fine-tuning, batched evaluation, and answering.

`config` (FinetuneConfig + experiment loading), `features` (questions and answers -> arrays,
spans -> text), `step` (retrieve-and-read on the mesh: the loss and the prediction), `loading`
(model, corpus and index loading shared by the roles), `finetune`, `evaluate`, `answer`.
"""
