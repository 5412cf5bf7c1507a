"""Request and answer models of function calls and variable reads."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from corral.kit.body import RequestModel
from corral.kit.responses import Answer

ARG_MAX = 1024 * 1024  # the body limit bounds it first; a device takes far less


def _arg_text(value: Any) -> Any:
    """A number is sent as its text (Particle's clients do); lone surrogates are refused."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes
            raise ValueError("must be valid Unicode text") from None
    return value


ArgText = Annotated[str, BeforeValidator(_arg_text), Field(max_length=ARG_MAX)]


class FunctionCall(RequestModel):
    """``arg`` (Particle's docs) or ``args`` (particle-api-js); ``format=raw`` (also in the
    query string) answers the bare return value."""

    arg: ArgText | None = Field(None, description="The function's argument")
    args: ArgText | None = Field(None, description="The argument, as particle-api-js names it")
    format: str | None = Field(None, max_length=10, description="raw: the bare return value")

    def argument(self) -> str:
        return self.arg if self.arg is not None else (self.args or "")


class ReadFormat(RequestModel):
    format: Literal["raw", "json"] | None = Field(
        None, description="raw: the bare value as text")


class FunctionAnswer(Answer):
    id: str
    name: str | None
    connected: bool
    return_value: int | None


class CoreInfo(Answer):
    name: str | None
    deviceID: str
    connected: bool


class VariableAnswer(Answer):
    cmd: Literal["VarReturn"]
    name: str
    result: Any
    coreInfo: CoreInfo
