"""Translate a SAM template to plain CloudFormation JSON (stdout), offline.

It first does what `sam package` would: code locations become S3 URIs (their content does not
matter to a linter) and the state machine's DefinitionUri is inlined, so cfn-lint also checks
the definition and its substitutions.

Recent cfn-lint no longer expands SAM resources, so a broken reference inside one (a wrong
!GetAtt in DefinitionSubstitutions, say) passes both `sam validate --lint` and `cfn-lint`.
The test command lints the translated template too. The translator only asks IAM to map
managed-policy *names* to ARNs; this template uses none, so the map is empty and no AWS call
is made.

Usage: python tests/sam_translate.py template.yaml > translated.json
"""

import json
import os
import sys

from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse


class NoManagedPolicyNames:
    def load(self) -> dict:
        return {}


def packaged(template: dict, base: str) -> dict:
    code_uri = "s3://agentpay-lint/bootstrap.zip"
    if "CodeUri" in template.get("Globals", {}).get("Function", {}):
        template["Globals"]["Function"]["CodeUri"] = code_uri
    for resource in template.get("Resources", {}).values():
        properties = resource.get("Properties", {})
        if resource.get("Type") == "AWS::Serverless::Function" and "CodeUri" in properties:
            properties["CodeUri"] = code_uri
        if resource.get("Type") == "AWS::Serverless::StateMachine" and "DefinitionUri" in properties:
            with open(os.path.join(base, properties.pop("DefinitionUri")), encoding="utf-8") as handle:
                properties["Definition"] = json.load(handle)
    return template


def main() -> None:
    path = sys.argv[1]
    with open(path, encoding="utf-8") as handle:
        template = yaml_parse(handle.read())
    base = os.path.dirname(os.path.abspath(path))
    translated = transform(packaged(template, base), {}, NoManagedPolicyNames())
    json.dump(translated, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
