"""Field checks for the frozen ``BlockSizes`` dataclasses: errors name the field."""


def check_power_of_two(name: str, value: object, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an int power of two >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
