"""Registry errors carry Confluent's error code and HTTP status, so the REST layer maps them 1:1."""

from __future__ import annotations

from ..errors import PigeonError


class RegistryError(PigeonError):
    """A refused registry operation; ``error_code`` and ``status`` are Confluent's."""

    error_code = 50001
    status = 500


class InvalidSchemaError(RegistryError, ValueError):
    """The schema text does not parse, or a reference it needs is missing."""

    error_code = 42201
    status = 422


class BadRequestError(RegistryError):
    """The request body is not JSON, or not the JSON object the endpoint expects."""

    error_code = 400
    status = 400


class UnprocessableRequestError(RegistryError):
    """A well-formed request with a field of the wrong type or an unknown field."""

    error_code = 422
    status = 422


class SubjectNotFoundError(RegistryError):
    error_code = 40401
    status = 404


class VersionNotFoundError(RegistryError):
    error_code = 40402
    status = 404


class SchemaNotFoundError(RegistryError):
    error_code = 40403
    status = 404


class SubjectSoftDeletedError(RegistryError):
    """A soft delete of a subject that is already soft-deleted."""

    error_code = 40404
    status = 404


class SubjectNotSoftDeletedError(RegistryError):
    """A permanent delete of a subject that was not soft-deleted first."""

    error_code = 40405
    status = 404


class VersionSoftDeletedError(RegistryError):
    error_code = 40406
    status = 404


class VersionNotSoftDeletedError(RegistryError):
    error_code = 40407
    status = 404


class SubjectCompatibilityNotConfiguredError(RegistryError):
    error_code = 40408
    status = 404


class SubjectModeNotConfiguredError(RegistryError):
    error_code = 40409
    status = 404


class IncompatibleSchemaError(RegistryError):
    error_code = 40901
    status = 409


class InvalidVersionError(RegistryError):
    error_code = 42202
    status = 422


class InvalidCompatibilityError(RegistryError):
    error_code = 42203
    status = 422


class InvalidModeError(RegistryError):
    error_code = 42204
    status = 422


class OperationNotPermittedError(RegistryError):
    """Refused by the mode (READONLY, IMPORT) or by the registry's state."""

    error_code = 42205
    status = 422


class ReferenceExistsError(RegistryError):
    """A schema version other schemas still reference cannot be deleted."""

    error_code = 42206
    status = 422


class IdDoesNotMatchError(RegistryError):
    """An import names an id that already belongs to another schema."""

    error_code = 42207
    status = 422


class InvalidSubjectNameError(RegistryError):
    error_code = 42208
    status = 422


class RegistryUnavailableError(RegistryError, ConnectionError):
    """A registry client could not reach the registry (raised on the client side only)."""

    error_code = 50003
    status = 503
