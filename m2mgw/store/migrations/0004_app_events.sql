-- m2mgw module database, schema level 4: the application listener.
--
-- An application lists the modules it belongs to (the modules op of the
-- application protocol): module_apps is read by application as well as by
-- module.

CREATE INDEX module_apps_app ON module_apps (app, module_id);
