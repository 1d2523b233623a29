"""Model-card templates shipped inside the installed package (filled by `hf_ptq_plugin.export.model_card`).

`quantized_model.md`: a Jinja template rendered by huggingface_hub's `ModelCard.from_template`.
"""
