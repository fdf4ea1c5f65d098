# title: match an AttributeError's obj= to get the object a failed lookup ran on
# threat: py.frames
# expect default: security_violation@analyze "Match pattern extracting attribute 'obj' is disallowed"
# expect guards_off: success {"got_import_guard": false, "obj": "None"}
try:
    __import__.missing_attribute
except AttributeError as exc:
    match exc:
        case AttributeError(obj=found):
            pass
return {"got_import_guard": found is __import__, "obj": repr(found)}
