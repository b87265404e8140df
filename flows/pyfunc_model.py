"""The registered model's entry point, logged with MLflow's models-from-code.

MLflow copies this file into the model and runs it at load time; nothing is pickled. The
weights (safetensors), the sentencepiece model and the config arrive as the ``package``
artifact (a glm model package directory), and the ``glm`` code travels in ``code_paths``.

``predict(["In the beginning God created the [MASK] and the earth."])`` returns the texts
with every blank filled; generation settings come through pyfunc ``params``.
"""

from __future__ import annotations

import dataclasses

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _as_texts(model_input) -> list[str]:
    """pyfunc hands a list of strings over as a list, an array or a one-column DataFrame."""
    if hasattr(model_input, "iloc"):
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(x) for x in column.tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in model_input]


class GLMFillModel(PythonModel):
    """Fills ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` blanks with a GLM model package."""

    # The signature is explicit at logging time (strings in, strings out, generation settings
    # as params; pyfunc_signature in registry.py). MLflow's type-hint validation would
    # duplicate it and, without hints, warns on every load: the class opts out, as MLflow's
    # own ChatModel does.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from glm.package import load_package

        self.model, self.tokenizer = load_package(context.artifacts["package"], device="cpu")
        self.model.eval()

    def predict(self, context, model_input, params=None) -> list[str]:
        from glm.errors import InputError
        from glm.generate import GenerationConfig, fill_blanks

        # The signature's params are GenerationConfig's fields (its defaults are the schema's).
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        defaults = GenerationConfig()
        try:
            cfg = GenerationConfig(
                **{
                    name: type(getattr(defaults, name))(value)
                    for name, value in (params or {}).items()
                    if name in known
                }
            )
        except (TypeError, ValueError, InputError) as err:
            # a caller's mistake: a 400 that says which setting, not a server stack trace
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return fill_blanks(self.model, self.tokenizer, _as_texts(model_input), cfg)


mlflow.models.set_model(GLMFillModel())
