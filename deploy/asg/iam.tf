# The instances' role, least privilege: find peers (Describe* take no resource scoping), read the
# one gossip keyring secret, complete
# their own group's termination lifecycle action, and, with acm_pca_arn, issue the fleet identity
# from that one CA with the API-passthrough template only.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "instance" {
  statement {
    sid       = "PeerDiscovery"
    actions   = ["autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeAutoScalingInstances", "ec2:DescribeInstances"]
    resources = ["*"]
  }

  statement {
    sid       = "GossipKeyring"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.gossip_keyring_secret_arn]
  }

  statement {
    sid       = "TerminationLifecycle"
    actions   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
    resources = [local.asg_arn]
  }

  dynamic "statement" {
    for_each = var.acm_pca_arn == null ? [] : [var.acm_pca_arn]
    content {
      sid       = "IssueFleetIdentity"
      actions   = ["acm-pca:IssueCertificate"]
      resources = [statement.value]
      condition {
        test     = "StringEquals"
        variable = "acm-pca:TemplateArn"
        values   = [replace(var.acm_pca_template_arn, "arn:aws:", "arn:${data.aws_partition.current.partition}:")]
      }
    }
  }

  dynamic "statement" {
    for_each = var.acm_pca_arn == null ? [] : [var.acm_pca_arn]
    content {
      sid       = "ReadFleetIdentity"
      actions   = ["acm-pca:GetCertificate", "acm-pca:GetCertificateAuthorityCertificate"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role" "this" {
  name_prefix        = "${var.name}-"
  description        = "fwdproxy ${var.name} appliances"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "instance" {
  name   = "fwdproxy"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.instance.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.this.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.this.name
  tags        = local.tags
}
