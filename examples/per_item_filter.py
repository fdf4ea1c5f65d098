# Mode per_item: runs once per item (as _item); returning None drops the item.
person = _item["json"]
if person["age"] < 18:
    return None
return {"json": {"greeting": f"Hello, {person['name']}!", "adult": True}}
