"""The recipe: typed sections (`sections`), YAML and `a.b=value` overrides (`load`, `yaml_file`), the checks a
type cannot express (`checks`), TRL fields passed through (`trainer_fields`) and data handed over in Python
(`in_memory`). The bottom floor above errors/logs: it imports no other subpackage.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "in_memory": ("InMemoryData",),
        "load": ("dump_recipe", "load_recipe", "parse_override", "path_in", "resolve_path"),
        "sections": (
            "DPOSection",
            "DataSection",
            "EvalSection",
            "GRPOSection",
            "LoggingSection",
            "ModelSection",
            "OutputSection",
            "PeftSection",
            "QuantSection",
            "Recipe",
            "SFTSection",
            "TrainingSection",
        ),
        "trainer_fields": ("build_config",),
    },
)
