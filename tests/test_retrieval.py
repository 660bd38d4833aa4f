from types import SimpleNamespace

from raee_ops.retrieval import _table_names


class PagedDB:
    """A catalogue that returns its tables two at a time, as remote LanceDB catalogues page them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def list_tables(self, page_token: str | None = None) -> SimpleNamespace:
        start = int(page_token or 0)
        end = start + 2
        return SimpleNamespace(tables=self.names[start:end], page_token=str(end) if end < len(self.names) else None)


def test_table_names_follow_every_page():
    names = [f"t{i}" for i in range(5)]
    assert _table_names(PagedDB(names)) == set(names)
