"""Name -> object tables (losses, datasets, judges, gold rewards) that refuse a name twice."""


def add(table: dict, kind: str, name: str, obj):
    """table[name] = obj; a name registered twice is an error (two modules claiming one name)."""
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = obj
    return obj


def decorator(table: dict, kind: str):
    """`register = decorator(TABLE, "judge")`, then `@register("name")` adds what it decorates."""
    def register(name: str):
        return lambda obj: add(table, kind, name, obj)
    return register
