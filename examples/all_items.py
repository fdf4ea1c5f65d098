# Mode all_items: runs once, sees every item as _items, returns a list of items.
import statistics

ages = [item["json"]["age"] for item in _items]
by_country = {}
for item in _items:
    by_country.setdefault(item["json"]["country"], []).append(item["json"]["name"])

return [
    {"json": {"people": len(ages), "mean_age": statistics.mean(ages), "by_country": by_country}}
]
