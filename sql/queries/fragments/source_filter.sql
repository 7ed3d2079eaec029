-- Narrows to one source namespace / workload ('*' = all): a condition to AND with others.
({namespace:String} = '*' OR src_namespace = {namespace:String})
AND ({workload:String} = '*' OR src_workload = {workload:String})
