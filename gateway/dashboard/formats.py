"""Numbers and money as ``dashboard.locale`` writes them (pure, no I/O).

Separators come from a small table of the tags we know; an unknown tag falls back
to its language, then to en-US. The resolved tag is handed to the 30-day chart as
well, so the numbers the browser draws read like the ones in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

# (thousands separator, decimal separator), as CLDR and so the browsers' Intl give them.
_LOCALES: Final[dict[str, tuple[str, str]]] = {
    "en-US": (",", "."),
    "en-GB": (",", "."),
    "vi-VN": (".", ","),
    "de-DE": (".", ","),
    "fr-FR": ("\u202f", ","),  # narrow no-break space
    "ja-JP": (",", "."),
}
_BY_TAG: Final = {tag.lower(): tag for tag in _LOCALES}
_BY_LANGUAGE: Final = {"en": "en-US", "vi": "vi-VN", "de": "de-DE", "fr": "fr-FR", "ja": "ja-JP"}


@dataclass(frozen=True, slots=True)
class NumberFormat:
    locale: str  # the tag in use after fallback; the chart's Intl.NumberFormat gets it too
    group: str
    point: str

    def number(self, value: int) -> str:
        digits = f"{abs(value):,}".replace(",", self.group)
        return f"-{digits}" if value < 0 else digits

    def decimal(self, value: Decimal, *, places: int, min_places: int = 0) -> str:
        """Rounded to ``places`` decimals, trailing zeros kept down to ``min_places``."""
        rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
        whole, _, fraction = f"{abs(rounded):f}".partition(".")
        fraction = fraction.rstrip("0").ljust(min_places, "0")
        text = self.number(int(whole)) + (self.point + fraction if fraction else "")
        return f"-{text}" if rounded < 0 else text

    def money(self, value: Decimal) -> str:
        # Fixed decimals, so that a column of costs lines up.
        return self.decimal(value, places=4, min_places=4)

    def amount(self, value: Decimal, currency: str) -> str:
        """Money with its currency code (issue 25): no cost is shown without one."""
        return f"{self.money(value)}\u00a0{currency}"


def number_format(locale: str) -> NumberFormat:
    """The format of a BCP 47 tag: the tag itself, else its language, else en-US."""
    wanted = locale.replace("_", "-").lower()
    tag = _BY_TAG.get(wanted) or _BY_LANGUAGE.get(wanted.split("-")[0], "en-US")
    group, point = _LOCALES[tag]
    return NumberFormat(locale=tag, group=group, point=point)
