from specialists.providers.base import (
    ApiKeyMissing,
    ModelMissing,
    Provider,
    ProviderContext,
    ProviderError,
    ProviderUnavailable,
    SharedResources,
    create_provider,
    provider_names,
)

__all__ = [
    "ApiKeyMissing",
    "ModelMissing",
    "Provider",
    "ProviderContext",
    "ProviderError",
    "ProviderUnavailable",
    "SharedResources",
    "create_provider",
    "provider_names",
]
